"""The gateway's side of Triton: gRPC streaming through the client's asyncio transport.

Every request is one ``ModelStreamInfer`` call; cancelling the task that iterates it (a client
that went away) cancels the call, which Triton turns into a cancelled request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from tritonvl.client.errors import TritonVLError
from tritonvl.client.grpc_transport import AsyncGrpcTransport
from tritonvl.client.request import Request
from tritonvl.client.stream import CancelToken, Chunk


@dataclass
class Outcome:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None  # per generated token, when asked
    media_sizes: str | None = None  # the server's geometry JSON (first response), docs/INTERFACE.md


class TritonBackend:
    def __init__(self, url: str, model: str, timeout: float) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        self._transport: AsyncGrpcTransport | None = None
        self.open_calls = 0  # gRPC calls not yet ended or cancelled (a metric)

    async def start(self) -> None:
        # the aio channel binds to the running event loop: create it inside the server's loop
        self._transport = AsyncGrpcTransport(self.url)

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()

    async def ready(self) -> bool:
        try:
            await self._transport.check_ready(self.model, timeout=5.0)
        except TritonVLError:
            return False
        return True

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        """The responses of one request; raises TritonVLError on a failure. Closing this iterator
        early (``aclose()``, or cancelling the task iterating it) cancels the gRPC call."""
        inner = self._transport.responses(request, self.model, self.timeout, CancelToken())
        self.open_calls += 1
        try:
            async for chunk in inner:
                yield chunk
        finally:
            await inner.aclose()
            self.open_calls -= 1

    async def collect(self, request: Request) -> Outcome:
        text, logprobs, last, media = [], [], Chunk(), None
        async for chunk in self.stream(request):
            text.append(chunk.text)
            logprobs.extend(chunk.logprobs)
            media = media or chunk.media_sizes
            last = chunk
        return Outcome("".join(text), last.finish_reason, last.input_tokens or 0, last.output_tokens or 0, logprobs,
                       media)
