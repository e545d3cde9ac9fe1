"""The asyncio client: the same surface as Client, any number of requests in flight."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .client import DEFAULT_MODEL, _configure
from .errors import TritonVLError
from .images import ImageOptions, ImageSource
from .params import SamplingParams
from .parsing import StopRules
from .request import Request, build_request
from .result import Result
from .stream import AsyncTextStream, CancelToken, Generation
from .videos import VideoOptions, VideoSource

if TYPE_CHECKING:
    from typing_extensions import Self


class AsyncClient:
    """asyncio twin of Client (tritonclient.grpc.aio over gRPC, aiohttp over HTTP).

    >>> async with AsyncClient("localhost:8001") as client:
    ...     results = await asyncio.gather(*(client.generate("Caption.", images=[p]) for p in paths))

    Use it from one event loop; ``cancel()`` cancels every request in flight, a stream's own
    ``cancel()`` only that one.
    """

    def __init__(self, url: str = "localhost:8001", protocol: str = "grpc", model: str = DEFAULT_MODEL,
                 timeout: float | None = 300.0, *, stop_rules: StopRules | None = None,
                 image_options: ImageOptions | None = None, verbose: bool = False,
                 headers: Mapping[str, str] | None = None, tls: bool = False, ca_file: str | None = None,
                 video_options: VideoOptions | None = None) -> None:
        """``headers``, ``tls``, ``ca_file``, ``video_options``: see Client."""
        _configure(self, url, protocol, model, timeout, stop_rules, image_options, verbose, asynchronous=True,
                   headers=headers, tls=tls, ca_file=ca_file, video_options=video_options)

    async def generate(self, prompt: str, images: Sequence[ImageSource] | ImageSource | None = None, *,
                       videos: Sequence[VideoSource] | VideoSource | None = None,
                       params: SamplingParams | None = None, **sampling) -> Result:
        """See Client.generate."""
        return await self._stream(self._request(prompt, images, None, params, sampling, False, videos)).until_done()

    async def chat(self, messages: list[dict], images: Sequence[ImageSource] | None = None, *,
                   videos: Sequence[VideoSource] | VideoSource | None = None,
                   params: SamplingParams | None = None, **sampling) -> Result:
        """See Client.chat."""
        return await self._stream(self._request(None, images, messages, params, sampling, False, videos)).until_done()

    def stream(self, prompt: str | None = None, images: Sequence[ImageSource] | ImageSource | None = None, *,
               messages: list[dict] | None = None, videos: Sequence[VideoSource] | VideoSource | None = None,
               params: SamplingParams | None = None, **sampling) -> AsyncTextStream:
        """``async for delta in client.stream(...)``; then ``.result``. See Client.stream."""
        return self._stream(self._request(prompt, images, messages, params, sampling, True, videos))

    def cancel(self) -> None:
        """Cancel every request of this client in flight."""
        for token in list(self._tokens):
            token.cancel()

    async def check_ready(self, timeout: float = 10.0) -> None:
        """Raise ServerUnavailable or ModelNotReady unless the model can take requests."""
        await self._transport.check_ready(self.model, timeout)

    async def is_ready(self, timeout: float = 10.0) -> bool:
        try:
            await self.check_ready(timeout)
        except TritonVLError:
            return False
        return True

    async def close(self) -> None:
        self.cancel()
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _request(self, prompt, images, messages, params, sampling, stream: bool, videos=None) -> Request:
        params = SamplingParams.from_kwargs(params, **sampling)
        return build_request(prompt, images, messages, params, stream, self.image_options, videos,
                             self.video_options)

    def _stream(self, request: Request) -> AsyncTextStream:
        token = CancelToken()

        async def chunks():
            self._tokens.add(token)
            try:
                async for chunk in self._transport.responses(request, self.model, self.timeout, token):
                    yield chunk
            finally:
                self._tokens.discard(token)

        return AsyncTextStream(chunks(), Generation(request, self.stop_rules), token.cancel)
