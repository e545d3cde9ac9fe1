"""tritonvl client: talk to a tritonvl (Qwen2.5-VL on Triton) server. Installs without torch.

>>> from tritonvl.client import Client
>>> with Client("localhost:8001") as c:
...     print(c.generate("Describe the image.", images=["cat.jpg"]).text)
...     print(c.generate("What happens?", videos=["clip.mp4"]).text)
"""

from __future__ import annotations

from .aio import AsyncClient
from .client import Client
from .errors import (
    ImageError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    RequestFailed,
    RequestTimeout,
    RequestTooLarge,
    ServerOverloaded,
    ServerUnavailable,
    ServiceUnavailable,
    TritonVLError,
    VideoError,
)
from .images import ImageOptions
from .params import SamplingParams
from .parsing import OutputParser, StopRules
from .result import Media, MediaSize, Result, Usage
from .rules.stops import StopStringMatcher
from .stream import AsyncTextStream, TextStream
from .videos import VideoOptions

__all__ = [
    "AsyncClient", "AsyncTextStream", "Client", "ImageError", "ImageOptions", "InvalidRequest", "Media", "MediaSize",
    "ModelNotFound", "ModelNotReady", "OutputParser", "RequestFailed", "RequestTimeout", "RequestTooLarge", "Result",
    "SamplingParams", "ServerOverloaded", "ServerUnavailable", "ServiceUnavailable", "StopRules",
    "StopStringMatcher", "TextStream", "TritonVLError", "Usage", "VideoError", "VideoOptions",
]
