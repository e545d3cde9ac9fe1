"""Video rules, pure numpy: the deployment's bounds, a part's sampling keys, how many frames to take
(qwen-vl-utils' smart_nframes), each frame's size (Qwen's smart_resize within a per-frame share of
``total_pixels``), Qwen's patch layout, and each temporal patch's timestamp (Qwen3-VL's prompt).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from tritonvl.client.rules.errors import InvalidArgument

TOKENS = {"min": 128, "max": 768, "total": 24576}  # qwen-vl-utils' VIDEO_MIN/MAX_TOKEN_NUM, total budget
PART_KEYS = ("fps", "num_frames", "nframes", "max_frames", "min_pixels", "max_pixels", "total_pixels")


@dataclass(frozen=True)
class VideoLimits:
    """The deployment's video bounds (preprocess parameters; docs/VIDEO.md)."""

    max_videos: int = 2
    max_bytes: int = 100 * 1024 * 1024
    max_seconds: float = 600.0
    max_frames: int = 4096  # in the video, before sampling
    fps: float = 2.0
    min_frames: int = 4
    max_sampled: int = 768
    # frame areas; None: qwen-vl-utils' token counts x the model's (patch x merge)^2 (``resolved``)
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    # the work of one request's videos: decoded pixels (frames x area, from headers) and seconds
    max_decoded_pixels: int = 4096 * 1920 * 1080
    decode_timeout_s: float = 60.0

    def resolved(self, factor: int) -> VideoLimits:
        """Unset frame areas from qwen-vl-utils' token counts (128, 768, 24576 per video) at this
        model's ``factor`` (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        unit = factor * factor
        return replace(self, min_pixels=self.min_pixels or TOKENS["min"] * unit,
                       max_pixels=self.max_pixels or TOKENS["max"] * unit,
                       total_pixels=self.total_pixels or TOKENS["total"] * unit)


class DecodeBudget:
    """What the videos of one request may still spend: decoded pixels (``max_decoded_pixels``),
    decode time (``decode_timeout_s`` from the start of the first) and video tokens (the prompt's
    room, ``max_model_len``). Charged from headers before decoding, the clock checked between frames."""

    def __init__(self, limits: VideoLimits, max_tokens: int | None = None, clock=time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self.pixels_left = limits.max_decoded_pixels
        self.deadline = clock() + limits.decode_timeout_s
        self.max_tokens, self.tokens = max_tokens, 0

    def spend_pixels(self, pixels: int, where: str, what: str) -> None:
        if pixels > self.pixels_left:
            spent = self.limits.max_decoded_pixels - self.pixels_left
            raise InvalidArgument(
                f"{where}: decoding {what} is {pixels} pixels"
                + (f" (after {spent} for the request's other videos)" if spent else "")
                + f", over the max_video_decoded_pixels limit of {self.limits.max_decoded_pixels} per request")
        self.pixels_left -= pixels

    def spend_tokens(self, tokens: int, where: str) -> None:
        self.tokens += tokens
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            raise InvalidArgument(f"{where}: the request's videos make {self.tokens} tokens, which does not fit "
                                  f"max_model_len={self.max_tokens} (with room to generate); lower fps, num_frames "
                                  "or total_pixels")

    def check_time(self, where: str) -> None:
        if self.clock() > self.deadline:
            raise InvalidArgument(f"{where}: decoding the request's videos took longer than the "
                                  f"video_decode_timeout_s limit ({self.limits.decode_timeout_s:g} s)")


def video_tokens(frames: int, size: tuple[int, int], geo: Geometry) -> int:
    """Tokens of ``frames`` frames of ``size`` (height, width) once padded and patchified."""
    t = ceil_to(frames, geo.temporal) // geo.temporal
    return t * (size[0] // geo.patch) * (size[1] // geo.patch) // (geo.merge * geo.merge)


@dataclass(frozen=True)
class Geometry:
    """The model's patch layout and normalization (from its image processor)."""

    patch: int
    merge: int
    temporal: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def options_of(part: dict, where: str, limits: VideoLimits) -> dict:
    """A message part's sampling keys, checked: positive numbers no larger than the deployment's."""
    out = {}
    for key in PART_KEYS:
        value = part.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidArgument(f"{where}.{key}: expected a positive number, got {value!r}")
        if key != "fps" and float(value) != int(value):
            raise InvalidArgument(f"{where}.{key}: expected an integer, got {value!r}")
        bound = {"num_frames": limits.max_sampled, "nframes": limits.max_sampled, "max_frames": limits.max_sampled,
                 "min_pixels": limits.max_pixels, "max_pixels": limits.max_pixels,
                 "total_pixels": limits.total_pixels}.get(key)
        if bound is not None and value > bound:
            raise InvalidArgument(f"{where}.{key}={value} is above this deployment's bound ({bound}): a request "
                                  "may lower the video budget, not raise it")
        out["num_frames" if key == "nframes" else key] = value if key == "fps" else int(value)
    if "fps" in out and "num_frames" in out:
        raise InvalidArgument(f"{where}: give fps or num_frames, not both")
    return out


def patchify(video: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, C, H, W] -> ([t*h*w, C*temporal*patch*patch], [t, h, w]): Qwen's video layout. T is padded
    to a multiple of ``temporal`` with the last frame; patches ordered by time, then merge window
    (rows of ``merge`` x ``merge`` patches kept together), each flattened channel, time, y, x."""
    frames, c, height, width = video.shape
    if pad := -frames % temporal:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        frames += pad
    t, h, w = frames // temporal, height // patch, width // patch
    x = video.reshape(t, temporal, c, h // merge, merge, patch, w // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, hb, wb, hm, wm, c, temporal, py, px
    return np.ascontiguousarray(x.reshape(t * h * w, c * temporal * patch * patch)), np.array([t, h, w], np.int64)


def target_size(height: int, width: int, frames: int, opts: dict, limits: VideoLimits, geo: Geometry,
                where: str) -> tuple[int, int]:
    """Each frame's size: Qwen's smart_resize within a per-frame area of at most total_pixels shared
    by the frames (two frames per temporal patch), never under 1.05 x min_pixels."""
    min_px = min(opts.get("min_pixels", limits.min_pixels), opts.get("max_pixels", limits.max_pixels))
    total = opts.get("total_pixels", limits.total_pixels)
    max_px = max(min(opts.get("max_pixels", limits.max_pixels), total / frames * geo.temporal), int(min_px * 1.05))
    return smart_resize(height, width, geo.patch * geo.merge, min_px, max_px, where)


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float,
                 where: str) -> tuple[int, int]:
    """Qwen's rule: sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise InvalidArgument(f"{where}: aspect ratio {width}x{height} is over Qwen's limit of 200:1")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def sample_count(total: int, video_fps: float | None, opts: dict, limits: VideoLimits, temporal: int,
                 where: str) -> int:
    """How many frames to take of ``total`` (qwen-vl-utils' smart_nframes rule)."""
    if "num_frames" in opts:
        n = round_to(opts["num_frames"], temporal)
    else:
        if not video_fps:
            raise InvalidArgument(f"{where}: the video states no frame rate: give num_frames")
        fps = opts.get("fps", limits.fps)
        low = ceil_to(limits.min_frames, temporal)
        high = floor_to(min(opts.get("max_frames", limits.max_sampled), limits.max_sampled, total), temporal)
        n = floor_to(min(max(total / video_fps * fps, low), high, total), temporal)
    if not temporal <= n <= total:
        raise InvalidArgument(f"{where}: {n} frames to sample from a video of {total} (at least {temporal})")
    return n


def round_to(n: float, k: int) -> int:
    return round(n / k) * k


def ceil_to(n: float, k: int) -> int:
    return math.ceil(n / k) * k


def floor_to(n: float, k: int) -> int:
    return math.floor(n / k) * k


def patch_times(frame_times: list[float], temporal: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's time (the list padded
    with its last time, as the frames are): the ``<t seconds>`` Qwen3-VL's prompt puts before it."""
    times = list(frame_times) + [frame_times[-1]] * (-len(frame_times) % temporal)
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]
