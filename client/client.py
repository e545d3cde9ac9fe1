"""The blocking client."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .images import ImageOptions, ImageSource
from .params import SamplingParams
from .parsing import StopRules
from .request import Request, build_request
from .result import Result
from .stream import CancelToken, Generation, TextStream
from .videos import VideoOptions, VideoSource

if TYPE_CHECKING:
    from typing_extensions import Self

DEFAULT_MODEL = "qwen2_5_vl"
PROTOCOLS = ("grpc", "http")


TLS_SCHEMES = ("https", "grpcs")


def normalize_url(url: str, protocol: str) -> str:
    """HOST:PORT from 'HOST:PORT', 'http(s)://HOST:PORT/' or 'grpc(s)://HOST:PORT'; checks the protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
    return url.split("://", 1)[-1].rstrip("/")


def wants_tls(url: str, tls: bool) -> bool:
    """TLS when asked, or when the URL's scheme is https:// or grpcs://."""
    return tls or ("://" in url and url.split("://", 1)[0].lower() in TLS_SCHEMES)


def _configure(client, url: str, protocol: str, model: str, timeout: float | None, stop_rules: StopRules | None,
               image_options: ImageOptions | None, verbose: bool, asynchronous: bool,
               headers: Mapping[str, str] | None = None, tls: bool = False, ca_file: str | None = None,
               video_options: VideoOptions | None = None) -> None:
    """The settings and the transport shared by Client and AsyncClient."""
    client.url = normalize_url(url, protocol)
    client.protocol = protocol
    client.model = model
    client.timeout = timeout
    client.stop_rules = stop_rules or StopRules()
    client.image_options = image_options or ImageOptions()
    client.video_options = video_options or VideoOptions()
    if protocol == "grpc":
        from . import grpc_transport as module

        kind = "AsyncGrpcTransport" if asynchronous else "GrpcTransport"
    else:
        from . import http_transport as module

        kind = "AsyncHttpTransport" if asynchronous else "HttpTransport"
    client._transport = getattr(module, kind)(client.url, verbose, headers=dict(headers or {}),
                                              tls=wants_tls(url, tls), ca_file=ca_file)
    client._tokens = set()


class Client:
    """Talk to a tritonvl server over gRPC (default) or HTTP.

    >>> with Client("localhost:8001") as client:
    ...     print(client.generate("Describe this image.", images=["cat.jpg"], max_tokens=64).text)

    One request at a time per Client (its connection is reused from request to request); use one
    Client per thread, or AsyncClient, for concurrency. ``timeout`` bounds each whole request, in
    seconds. ``stop_rules`` is the model-specific safety net (see ``StopRules``). ``image_options`` /
    ``video_options``: the client-side caps on what it reads (ImageOptions, VideoOptions).

    Behind an authenticating TLS proxy (docs/SECURITY.md): ``tls=True`` (implied by an ``https://``
    or ``grpcs://`` URL) verifies the server against ``ca_file`` (PEM) or the system's roots;
    ``headers`` go with every request (e.g. ``{"Authorization": "Bearer ..."}``; gRPC metadata keys
    are lower-cased).
    """

    def __init__(self, url: str = "localhost:8001", protocol: str = "grpc", model: str = DEFAULT_MODEL,
                 timeout: float | None = 300.0, *, stop_rules: StopRules | None = None,
                 image_options: ImageOptions | None = None, verbose: bool = False,
                 headers: Mapping[str, str] | None = None, tls: bool = False, ca_file: str | None = None,
                 video_options: VideoOptions | None = None) -> None:
        _configure(self, url, protocol, model, timeout, stop_rules, image_options, verbose, asynchronous=False,
                   headers=headers, tls=tls, ca_file=ca_file, video_options=video_options)
        self._lock = threading.Lock()

    def generate(self, prompt: str, images: Sequence[ImageSource] | ImageSource | None = None, *,
                 videos: Sequence[VideoSource] | VideoSource | None = None,
                 params: SamplingParams | None = None, **sampling) -> Result:
        """One completion of ``prompt`` about ``images`` and ``videos`` (the user turn: the images, the
        videos, then the text). A video is a path, bytes, a ``data:video/...`` URI or a list of frames
        (``videos=[[frame1, frame2, ...]]``); the server samples and decodes it (docs/VIDEO.md).

        ``sampling``: SamplingParams fields (max_tokens=..., temperature=..., stop=[...]) overriding
        ``params``. Raises InvalidRequest before sending when a value breaks the server's rules.
        """
        return self._stream(self._request(prompt, images, None, params, sampling, False, videos)).until_done()

    def chat(self, messages: list[dict], images: Sequence[ImageSource] | None = None, *,
             videos: Sequence[VideoSource] | VideoSource | None = None,
             params: SamplingParams | None = None, **sampling) -> Result:
        """One reply to OpenAI-style ``messages`` (multi-turn).

        Image parts: ``{"type": "image", "image": SOURCE}``, ``{"type": "image_url", "image_url":
        {"url": ...}}``, or a bare ``{"type": "image"}`` taking the next of ``images``. Video parts:
        ``{"type": "video", "video": SOURCE}``, ``{"type": "video_url", "video_url": {"url": SOURCE}}``
        or a bare ``{"type": "video"}`` taking the next of ``videos``; keys such as ``fps``,
        ``num_frames`` or ``max_pixels`` on a video part go to the server.
        """
        return self._stream(self._request(None, images, messages, params, sampling, False, videos)).until_done()

    def stream(self, prompt: str | None = None, images: Sequence[ImageSource] | ImageSource | None = None, *,
               messages: list[dict] | None = None, videos: Sequence[VideoSource] | VideoSource | None = None,
               params: SamplingParams | None = None, **sampling) -> TextStream:
        """Stream the reply: iterate for text deltas, then read ``.result``.

        >>> with client.stream("Describe it.", images=["cat.jpg"]) as s:
        ...     for delta in s:
        ...         print(delta, end="")
        >>> s.result.finish_reason
        """
        return self._stream(self._request(prompt, images, messages, params, sampling, True, videos))

    def cancel(self) -> None:
        """Cancel the request in flight, if any (safe from another thread)."""
        with self._lock:
            tokens = list(self._tokens)
        for token in tokens:
            token.cancel()

    def check_ready(self, timeout: float = 10.0) -> None:
        """Raise ServerUnavailable or ModelNotReady unless the model can take requests."""
        self._transport.check_ready(self.model, timeout)

    def is_ready(self, timeout: float = 10.0) -> bool:
        from .errors import TritonVLError

        try:
            self.check_ready(timeout)
        except TritonVLError:
            return False
        return True

    def metadata(self) -> dict:
        """The model's metadata (inputs and outputs) as the server describes it."""
        return self._transport.metadata(self.model)

    def close(self) -> None:
        self.cancel()
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, prompt, images, messages, params, sampling, stream: bool, videos=None) -> Request:
        params = SamplingParams.from_kwargs(params, **sampling)
        return build_request(prompt, images, messages, params, stream, self.image_options, videos,
                             self.video_options)

    def _stream(self, request: Request) -> TextStream:
        token = CancelToken()

        def chunks():
            with self._lock:
                self._tokens.add(token)
            try:
                yield from self._transport.responses(request, self.model, self.timeout, token)
            finally:
                with self._lock:
                    self._tokens.discard(token)

        return TextStream(chunks(), Generation(request, self.stop_rules), token.cancel)
