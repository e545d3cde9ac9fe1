"""gRPC transport: every request goes over ModelStreamInfer (the ensemble is decoupled, so plain
ModelInfer is refused); a non-streaming request simply gets one response on that stream.

One channel per client, reused by every request. Images travel as raw bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
from tritonclient.utils import InferenceServerException

from .errors import (
    ModelNotReady,
    RequestFailed,
    RequestTimeout,
    RequestTooLarge,
    ServerUnavailable,
    TritonVLError,
    status_error,
)
from .request import Request
from .rules.errors import untagged
from .stream import Cancelled, CancelToken, Chunk

_CANCEL = object()
_GRACE = 5.0  # seconds past the gRPC deadline before the client stops waiting on its own


def chunk_from_result(result) -> Chunk:
    """A tritonclient InferResult (sync or aio) -> Chunk."""

    def first(name: str):
        arr = result.as_numpy(name)
        return None if arr is None or arr.size == 0 else arr.reshape(-1)[0]

    text = first("text_output")
    reason = first("finish_reason")
    ids = result.as_numpy("output_ids")
    params = result.get_response().parameters
    # the last response carries the FINAL flag; ours also is the only one with a finish_reason
    final = ("triton_final_response" in params and params["triton_final_response"].bool_param) or reason is not None
    n_in, n_out, n_img = first("num_input_tokens"), first("num_output_tokens"), first("num_image_tokens")
    logprobs = result.as_numpy("logprobs")
    return Chunk(
        text=_text(text),
        ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        finish_reason=_text(reason) or None,
        input_tokens=None if n_in is None else int(n_in),
        output_tokens=None if n_out is None else int(n_out),
        image_tokens=None if n_img is None else int(n_img),
        final=bool(final),
        logprobs=[] if logprobs is None else [json.loads(e) for e in logprobs.reshape(-1)],
        media_sizes=_text(first("media_sizes")) or None,
    )


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def checked_chunk(result, error, url: str) -> Chunk:
    """One stream callback's (result, error) as a Chunk, or the error raised as a TritonVLError."""
    if error is not None:
        raise stream_error(error, url)
    return chunk_from_result(result)


def stream_error(error, url: str) -> TritonVLError:
    """An error of the stream, by status: the call's gRPC status (the transport's: unreachable,
    deadline, message too large, ...), or for an error inside the stream, which Triton sends as text
    only, the status tag every tritonvl model puts in front of its message (client.errors.status_error)."""
    if hasattr(error, "code") and hasattr(error, "details"):  # a raw grpc.RpcError (aio streams)
        status, message = str(error.code()), error.details() or ""
    else:
        status = error.status() if hasattr(error, "status") else None
        message = (error.message() if hasattr(error, "message") else None) or str(error)
    if untagged(message)[0]:  # a tritonvl model's own status (also on a unary call's status)
        return status_error(None, message)
    if status == "StatusCode.UNAVAILABLE":
        err = ServerUnavailable(f"cannot reach a Triton server at {url} over gRPC ({_short(message)})")
    elif status == "StatusCode.RESOURCE_EXHAUSTED":
        # on the call, gRPC's own size limits (an overloaded tritonvl engine says so inside the stream)
        err = RequestTooLarge(f"the request is larger than gRPC takes ({_short(message)})")
    else:
        return status_error(status, message)
    err.status = status.removeprefix("StatusCode.")
    return err


def _short(message: str) -> str:
    for marker in ("Connection refused", "failed to connect", "Name resolution", "Socket closed"):
        if marker.lower() in message.lower():
            return marker.lower()
    return message.splitlines()[0][:200] if message else "unavailable"


def _tls(tls: bool, ca_file: str | None) -> dict:
    """tritonclient's channel arguments: TLS with the CA file (PEM path) or, without one, the system's roots."""
    if ca_file and not os.path.isfile(ca_file):
        raise ValueError(f"ca_file {ca_file!r}: no such file")
    return {"ssl": True, "root_certificates": ca_file} if tls else {}


def _metadata(headers: dict | None) -> dict | None:
    """gRPC metadata keys must be lower-case (HTTP/2)."""
    return {k.lower(): v for k, v in headers.items()} if headers else None


class GrpcTransport:
    """Blocking gRPC transport: one request in flight at a time."""

    def __init__(self, url: str, verbose: bool = False, headers: dict | None = None, tls: bool = False,
                 ca_file: str | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.headers = _metadata(headers)
        self._module = grpcclient
        self._client = grpcclient.InferenceServerClient(url, verbose=verbose, **_tls(tls, ca_file))
        self._busy = threading.Lock()

    def check_ready(self, model: str, timeout: float = 10.0) -> None:
        try:
            live = self._client.is_server_live(headers=self.headers, client_timeout=timeout)
        except InferenceServerException as exc:
            raise ServerUnavailable(f"cannot reach a Triton server at {self.url} over gRPC ({_short(exc.message())})") from None
        if not live:
            raise ServerUnavailable(f"the Triton server at {self.url} is not live")
        try:
            ready = self._client.is_model_ready(model, headers=self.headers, client_timeout=timeout)
        except InferenceServerException as exc:
            raise ModelNotReady(f"model {model!r} on {self.url}: {exc.message()}") from None
        if not ready:
            raise ModelNotReady(f"model {model!r} is not ready on {self.url} (the server is up)")

    def metadata(self, model: str) -> dict:
        return self._client.get_model_metadata(model, headers=self.headers, as_json=True)

    def responses(self, request: Request, model: str, timeout: float | None,
                  token: CancelToken) -> Iterator[Chunk]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Client already has a request in flight; use one Client per thread "
                               "or AsyncClient for concurrent requests")
        q: queue.Queue = queue.Queue()
        finished = False
        try:
            token.on_cancel(lambda: q.put(_CANCEL))
            self._client.start_stream(callback=lambda result, error: q.put((result, error)), stream_timeout=timeout,
                                      headers=self.headers)
            try:
                self._client.async_stream_infer(model, request.grpc_inputs(self._module),
                                                enable_empty_final_response=True)
            except InferenceServerException as exc:
                # newer tritonclients raise here when the stream already failed; the detail is in the queue
                try:
                    exc = q.get(timeout=1.0)[1] or exc
                except queue.Empty:
                    pass
                raise stream_error(exc, self.url) from None
            deadline = None if timeout is None else time.monotonic() + timeout + _GRACE
            while True:
                try:
                    item = q.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.01))
                except queue.Empty:
                    raise RequestTimeout(f"no complete answer within {timeout} s") from None
                if item is _CANCEL:
                    raise Cancelled()
                chunk = checked_chunk(*item, self.url)
                finished = chunk.final
                yield chunk
                if finished:
                    return
        finally:
            self._client.stop_stream(cancel_requests=not finished)
            self._busy.release()

    def close(self) -> None:
        self._client.close()


class AsyncGrpcTransport:
    """asyncio gRPC transport (tritonclient.grpc.aio): any number of concurrent requests."""

    def __init__(self, url: str, verbose: bool = False, headers: dict | None = None, tls: bool = False,
                 ca_file: str | None = None) -> None:
        import tritonclient.grpc.aio as aioclient

        self.url = url
        self.headers = _metadata(headers)
        self._module = aioclient
        self._client = aioclient.InferenceServerClient(url, verbose=verbose, **_tls(tls, ca_file))

    async def check_ready(self, model: str, timeout: float = 10.0) -> None:
        try:
            live = await self._client.is_server_live(headers=self.headers, client_timeout=timeout)
        except InferenceServerException as exc:
            raise ServerUnavailable(
                f"cannot reach a Triton server at {self.url} over gRPC ({_short(exc.message())})") from None
        if not live:
            raise ServerUnavailable(f"the Triton server at {self.url} is not live")
        try:
            ready = await self._client.is_model_ready(model, headers=self.headers, client_timeout=timeout)
        except InferenceServerException as exc:
            raise ModelNotReady(f"model {model!r} on {self.url}: {exc.message()}") from None
        if not ready:
            raise ModelNotReady(f"model {model!r} is not ready on {self.url} (the server is up)")

    async def responses(self, request: Request, model: str, timeout: float | None,
                        token: CancelToken) -> AsyncIterator[Chunk]:
        done = asyncio.Event()
        # no empty final response here: newer tritonclients reserve that parameter in the aio API
        # (and an error inside the request iterator surfaces only as a cancelled call)
        item = {"model_name": model, "inputs": request.grpc_inputs(self._module)}

        async def requests():
            yield item
            await done.wait()  # keep our side open until the last response

        call = self._client.stream_infer(requests(), stream_timeout=timeout, headers=self.headers)
        token.on_cancel(call.cancel)
        finished = False
        try:
            async for result, error in call:
                if token.cancelled:
                    break
                chunk = checked_chunk(result, error, self.url)
                finished = chunk.final
                yield chunk
                if finished:
                    return
            if token.cancelled:
                raise Cancelled()
            raise RequestFailed("the server closed the stream before the final response")
        except (asyncio.CancelledError, TritonVLError):
            if token.cancelled:
                raise Cancelled() from None
            raise
        except grpc.RpcError as exc:
            if token.cancelled:
                raise Cancelled() from None
            raise stream_error(exc, self.url) from None
        finally:
            done.set()
            if not finished:
                call.cancel()

    async def close(self) -> None:
        await self._client.close()
