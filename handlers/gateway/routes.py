"""The endpoints. A client that goes away cancels its Triton call (streams: when the response is
torn down; whole answers: by a watcher on the connection). The key, the body size and the bound on
requests in flight are checked before any of this runs, before the body is read (app.Guard)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from tritonvl.client.errors import TritonVLError
from tritonvl.client.params import SamplingParams
from tritonvl.handlers.gateway.config import GatewayConfig
from tritonvl.handlers.gateway.errors import APIError, bad_request, from_triton
from tritonvl.handlers.gateway.mapping import TritonRequest, parse_chat, parse_completion
from tritonvl.handlers.gateway.metrics import GatewayMetrics
from tritonvl.handlers.gateway.responses import DONE, Reply, media_sizes, sse, usage
from tritonvl.handlers.gateway.tools import ToolPlan, ToolStream, delta_chunks
from tritonvl.handlers.gateway.triton import TritonBackend

CLIENT_GONE = 499  # nginx's "client closed request": only our metrics ever see it


class SSEResponse(StreamingResponse):
    """A stream with a clean-up that runs however the response ends. A disconnect cancels the
    sending task while the body iterator may sit at a ``yield`` (its ``finally`` would then wait
    for the garbage collector), so the iterator is closed here and ``cleanup`` cancels the Triton call."""

    def __init__(self, content, cleanup: Callable[[], Awaitable[None]], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.cleanup()


@dataclass
class Gateway:
    config: GatewayConfig
    backend: TritonBackend
    metrics: GatewayMetrics

    async def chat(self, http: Request) -> Response:
        return await self._generate(http, parse_chat(await _json(http)), "chat")

    async def completions(self, http: Request) -> Response:
        return await self._generate(http, parse_completion(await _json(http)), "completions")

    async def models(self) -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "tritonvl", "root": name} for name in self.config.names]}

    async def health(self) -> Response:
        if await self.backend.ready():
            return JSONResponse({"status": "ok"})
        err = APIError(503, f"Triton model {self.config.triton_model!r} at {self.config.triton_url} is not ready",
                       "service_unavailable", None, "triton_unavailable")
        return JSONResponse(err.body(), 503)

    async def describe(self, http: Request) -> Response:
        """The upload endpoint of the FastAPI Qwen2.5-VL tutorials: multipart ``file`` (+ ``prompt``,
        ``max_tokens``) -> ``{description, inference_time, model, usage}``. A ``video/*`` upload (or a
        video file name) goes to the server as a video; anything else as an image."""
        form = await http.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("file", "file: expected a multipart/form-data upload with a 'file' field")
        video = is_video_upload(upload.content_type, upload.filename)
        prompt = form.get("prompt") or (self.config.describe_video_prompt if video else self.config.describe_prompt)
        max_tokens = form.get("max_tokens")
        try:
            params = SamplingParams.from_kwargs(max_tokens=None if max_tokens in (None, "") else int(max_tokens))
        except ValueError:
            raise bad_request("max_tokens", f"max_tokens: expected a positive integer, got {max_tokens!r}") from None
        data = await upload.read()
        content = [{"type": "video" if video else "image"}, {"type": "text", "text": str(prompt)}]
        request = TritonRequest(params, messages=[{"role": "user", "content": content}],
                                **({"videos": [data]} if video else {"images": [data]}))
        start = time.perf_counter()
        out = await self._whole(http, request, "describe")
        if out is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse({"description": out.text, "inference_time": round(time.perf_counter() - start, 4),
                             "model": self.config.names[0], "usage": usage(out.prompt_tokens, out.completion_tokens)})

    async def _generate(self, http: Request, parsed, endpoint: str) -> Response:
        model = self._model(parsed.model)
        reply = Reply(endpoint == "chat", model, parsed.include_usage, parsed.logprobs)
        tools: ToolPlan | None = parsed.tools
        if parsed.stream:
            return await self._stream(http, parsed.request, reply, endpoint, tools)
        out = await self._whole(http, parsed.request, endpoint)
        if out is None:
            return Response(status_code=CLIENT_GONE)
        content, calls = tools.parse(out.text) if tools is not None else (out.text, None)
        return JSONResponse({**reply.full(content, out.finish_reason, usage(out.prompt_tokens, out.completion_tokens),
                                          out.logprobs, calls), **media_sizes(out.media_sizes)})

    def _model(self, name: str | None) -> str:
        if name is None:
            return self.config.names[0]
        if name not in self.config.names:
            raise APIError(404, f"The model {name!r} does not exist (served: {list(self.config.names)})",
                           "invalid_request_error", "model", "model_not_found")
        return name

    async def _whole(self, http: Request, request: TritonRequest, endpoint: str):
        """The Outcome, or None when the client went away first (its Triton call is then cancelled)."""
        task = asyncio.ensure_future(self.backend.collect(request))
        watcher = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.metrics.cancelled.labels(endpoint).inc()
            return None
        try:
            out = task.result()
        except TritonVLError as exc:
            raise from_triton(exc) from None
        self.metrics.tokens(out.prompt_tokens, out.completion_tokens)
        return out

    async def _stream(self, http: Request, request: TritonRequest, reply: Reply, endpoint: str,
                      tools: ToolPlan | None = None) -> Response:
        start = time.perf_counter()
        chunks = self.backend.stream(request)
        try:
            # The first response decides the status: a refused request is a 4xx, not an event in a 200.
            first = asyncio.ensure_future(chunks.__anext__())
            watcher = asyncio.ensure_future(_disconnected(http))
            try:
                await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                self.metrics.cancelled.labels(endpoint).inc()
                return Response(status_code=CLIENT_GONE)
            chunk = first.result()
        except TritonVLError as exc:
            raise from_triton(exc) from None

        state = {"done": False, "ttft": False}
        calls: ToolStream | None = tools.stream() if tools is not None else None

        async def events():
            nonlocal chunk
            try:
                if reply.chat:  # the role chunk, with the request's media sizes
                    yield sse({**reply.chunk("", first=True), **media_sizes(chunk.media_sizes)})
                while True:
                    if chunk.text:
                        if not state["ttft"]:
                            state["ttft"] = True
                            self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - start)
                    if calls is not None:  # content outside <tool_call> blocks, then each finished call
                        for event in tool_events(reply, *calls.feed(chunk.text), chunk.logprobs):
                            yield event
                    elif chunk.text or chunk.logprobs:  # tokens whose text is held back still have logprobs
                        yield sse(reply.chunk(chunk.text, logprobs=chunk.logprobs))
                    if chunk.final:
                        break
                    chunk = await chunks.__anext__()
                if calls is not None:
                    for event in tool_events(reply, *calls.finish(), None):
                        yield event
                use = usage(chunk.input_tokens or 0, chunk.output_tokens or 0)
                self.metrics.tokens(use["prompt_tokens"], use["completion_tokens"])
                yield sse(reply.chunk("", finish=chunk.finish_reason, called=bool(calls is not None and calls.calls)))
                if reply.include_usage:
                    yield sse(reply.usage_chunk(use))
            except TritonVLError as exc:  # after the status line: an error event, as OpenAI's SDKs expect
                yield sse(from_triton(exc).body())
            state["done"] = True
            yield DONE

        async def cleanup() -> None:
            if not state["done"]:
                state["done"] = True
                self.metrics.cancelled.labels(endpoint).inc()
            await chunks.aclose()  # cancels the gRPC call unless it already ended

        return SSEResponse(events(), cleanup, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def tool_events(reply: Reply, content: str, calls: list[dict], logprobs: list[dict] | None) -> list[bytes]:
    """SSE events for one step of a tool-reading stream: its content (with the step's logprobs), then
    each finished call as deltas (index, id and name; then the arguments)."""
    events = [sse(reply.chunk(content, logprobs=logprobs))] if content or logprobs else []
    return events + [sse(reply.chunk("", tool_calls=[d])) for call in calls for d in delta_chunks(call)]


VIDEO_SUFFIXES = (".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi", ".mpeg", ".mpg", ".ts", ".flv", ".3gp")


def is_video_upload(content_type: str | None, filename: str | None) -> bool:
    """A ``video/*`` content type, or a video file name when the type says nothing (curl -F sends
    application/octet-stream for unknown suffixes). GIFs stay images."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind.startswith("video/"):
        return True
    generic = kind in ("", "application/octet-stream")
    return generic and (filename or "").lower().endswith(VIDEO_SUFFIXES)


async def _json(http: Request) -> dict:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(None, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    return body


async def _disconnected(http: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
