"""From transport responses to text deltas and a Result, shared by Client and AsyncClient."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .parsing import OutputParser, StopRules
from .request import Request
from .result import Media, Result, Usage

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class Chunk:
    """One server response, protocol-neutral."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    image_tokens: int | None = None
    final: bool = False
    # asked with return_logprobs: per token of ``ids``, {"token", "token_id", "logprob", "top_logprobs"}
    logprobs: list[dict] = field(default_factory=list)
    media_sizes: str | None = None  # the JSON output, in the first response (docs/INTERFACE.md)


class Cancelled(Exception):
    """Raised by a transport when its request was cancelled by the caller (never escapes the client)."""


class CancelToken:
    """Cancellation of one request: the transport registers how, the caller triggers it."""

    def __init__(self) -> None:
        self.cancelled = False
        self._actions: list[Callable[[], None]] = []

    def on_cancel(self, action: Callable[[], None]) -> None:
        self._actions.append(action)
        if self.cancelled:
            action()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            for action in list(self._actions):
                action()


class Generation:
    """Books the chunks of one request: parser, timings, counts."""

    def __init__(self, request: Request, rules: StopRules) -> None:
        self.request = request
        self.parser = OutputParser(request.params, rules)
        self.start = time.perf_counter()
        self.ttft: float | None = None
        self.text: list[str] = []
        self.server_reason: str | None = None
        self.usage = Usage(images=len(request.images), videos=len(request.videos))
        self.media: Media | None = None
        self.result: Result | None = None

    def feed(self, chunk: Chunk) -> str:
        delta = self.parser.feed(chunk.text, chunk.ids)
        self._book(chunk)
        return self._emit(delta)

    def finish(self, reason: str | None = None) -> tuple[str, Result]:
        """The held-back tail and the Result; ``reason`` overrides (e.g. "cancelled")."""
        tail = self._emit(self.parser.flush()) if reason is None else ""
        final = reason or self.parser.finish_reason(self.server_reason)
        if self.parser.stopped and self.usage.output_tokens is not None:
            self.usage.output_tokens = min(self.usage.output_tokens, self.parser.count)
        self.result = Result("".join(self.text), final, list(self.parser.ids), self.usage,
                             time.perf_counter() - self.start, self.ttft,
                             self.parser.stop, self.media)
        return tail, self.result

    def _book(self, chunk: Chunk) -> None:
        if chunk.media_sizes and self.media is None:
            try:
                self.media = Media.from_json(chunk.media_sizes)
            except ValueError:  # a server's odd geometry must not cost the answer: result.media stays None
                pass
        if chunk.finish_reason:
            self.server_reason = chunk.finish_reason
        for name in ("input_tokens", "output_tokens", "image_tokens"):
            value = getattr(chunk, name)
            if value is not None:
                setattr(self.usage, name, value)

    def _emit(self, delta: str) -> str:
        if delta:
            if self.ttft is None and self.request.stream:
                self.ttft = time.perf_counter() - self.start
            self.text.append(delta)
        return delta


class _StreamBase:
    """What the sync and async text streams share: the chunks, the generation, the cancel hook."""

    def __init__(self, chunks, generation: Generation, cancel: Callable[[], None]) -> None:
        self._chunks = chunks  # Iterator[Chunk] or AsyncIterator[Chunk]
        self._gen = generation
        self._cancel = cancel
        self._iter = self._run()

    @property
    def result(self) -> Result | None:
        return self._gen.result


class TextStream(_StreamBase):
    """Iterate for text deltas; ``result`` holds the Result once the iteration has ended.

    ``cancel()`` (from any thread) ends the stream early with finish_reason "cancelled". Leaving
    the loop early (``break``) or the ``with`` block also cancels the request. Errors raise
    TritonVLError subclasses.
    """

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def __next__(self) -> str:
        return next(self._iter)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cancel(self) -> None:
        self._cancel()

    def close(self) -> None:
        """Stop reading; cancels the request if it has not finished."""
        self._iter.close()
        self._chunks.close()
        if self._gen.result is None:
            self._gen.finish("cancelled")

    def until_done(self) -> Result:
        """Consume the rest of the stream and return the Result."""
        for _ in self._iter:
            pass
        assert self._gen.result is not None
        return self._gen.result

    def _run(self) -> Iterator[str]:
        gen = self._gen
        gen.start = time.perf_counter()
        try:
            for chunk in self._chunks:
                delta = gen.feed(chunk)
                if delta:
                    yield delta
                if gen.parser.stopped:
                    break  # the client's own stop: closing the transport cancels the rest
        except Cancelled:
            gen.finish("cancelled")
            return
        except GeneratorExit:  # the caller stopped reading early
            gen.finish("cancelled")
            raise
        finally:
            self._chunks.close()
        tail, _ = gen.finish()
        if tail:
            yield tail


class AsyncTextStream(_StreamBase):
    """``async for`` the text deltas; the asyncio twin of TextStream."""

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter

    async def __anext__(self) -> str:
        return await self._iter.__anext__()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def cancel(self) -> None:
        self._cancel()

    async def aclose(self) -> None:
        await self._iter.aclose()
        await self._chunks.aclose()
        if self._gen.result is None:
            self._gen.finish("cancelled")

    async def until_done(self) -> Result:
        async for _ in self._iter:
            pass
        assert self._gen.result is not None
        return self._gen.result

    async def _run(self) -> AsyncIterator[str]:
        gen = self._gen
        gen.start = time.perf_counter()
        try:
            async for chunk in self._chunks:
                delta = gen.feed(chunk)
                if delta:
                    yield delta
                if gen.parser.stopped:
                    break
        except Cancelled:
            gen.finish("cancelled")
            return
        except GeneratorExit:
            gen.finish("cancelled")
            raise
        finally:
            await self._chunks.aclose()
        tail, _ = gen.finish()
        if tail:
            yield tail
