"""What a request returns."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Usage:
    """Token counts as the server reports them.

    ``image_tokens``: the image (and video) placeholder tokens of the prompt (counted inside ``input_tokens``);
    None from servers without a ``num_image_tokens`` output. ``images`` / ``videos``: how many were sent.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    images: int = 0
    image_tokens: int | None = None
    videos: int = 0

    @property
    def total_tokens(self) -> int | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class MediaSize:
    """One image or video of the request: its size as sent (``width`` x ``height``, EXIF orientation
    applied) and the size the model saw (``resized_width`` x ``resized_height``: Qwen's smart_resize
    with the request's pixel budget). Videos: ``frame_times``, seconds into the video of each frame
    the model saw."""

    kind: str  # "image" or "video"
    width: int
    height: int
    resized_width: int
    resized_height: int
    frame_times: tuple[float, ...] = ()

    @property
    def original(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def resized(self) -> tuple[int, int]:
        return self.resized_width, self.resized_height


@dataclass(frozen=True)
class Media:
    """The server's ``media_sizes`` (docs/INTERFACE.md): the request's images and videos in the order
    they were given, the served model's ``family`` and the grid its grounding coordinates are on
    (``coordinates``: "absolute" = pixels of the resized image, "relative_1000" = 0-1000)."""

    family: str | None = None
    coordinates: str | None = None
    images: tuple[MediaSize, ...] = ()
    videos: tuple[MediaSize, ...] = ()

    @classmethod
    def from_json(cls, text: str | bytes) -> Media:
        """Parse the output; ValueError names what is wrong with it."""
        try:
            obj = json.loads(text)
            return cls(obj.get("family"), obj.get("coordinates"),
                       tuple(_size("image", d) for d in obj.get("images") or ()),
                       tuple(_size("video", d) for d in obj.get("videos") or ()))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"media_sizes: not the server's geometry JSON ({exc})") from None


def _size(kind: str, d: dict) -> MediaSize:
    return MediaSize(kind, int(d["width"]), int(d["height"]), int(d["resized_width"]), int(d["resized_height"]),
                     tuple(float(t) for t in d.get("frame_times") or ()))


@dataclass
class Result:
    """One finished generation.

    ``finish_reason``: "stop" (eos, a stop id or a stop string), "length" (max_tokens),
    "cancelled", or "error". ``latency``: seconds from sending to the last response. ``ttft``:
    seconds to the first non-empty text delta (streaming only; None otherwise).
    """

    text: str
    finish_reason: str | None
    output_ids: list[int] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    latency: float = 0.0
    ttft: float | None = None
    # the stop string or token id the client's parser found in the output (None when the server's own
    # stop left no trace in it, e.g. a stop string it already cut)
    stop: str | int | None = None
    # each image's and video's size as sent and as the model saw it; None from a server without it
    media: Media | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (usage included, total_tokens added)."""
        d = asdict(self)
        d["usage"]["total_tokens"] = self.usage.total_tokens
        return d
