"""Video intake: encoded bytes (MP4, WebM, GIF, ... through PyAV's bundled FFmpeg) or a JSON list of
frames in; sampled, resized, normalized and patchified rows out (Qwen's video layout).

Sampling follows qwen-vl-utils' rules (our own code): by ``num_frames`` (rounded to the temporal
patch) or by ``fps`` (total / video fps * fps, clamped to [min_frames, max_frames] and the video's own
frames, floored to the temporal patch), frames picked evenly over the whole video; each frame resized
by Qwen's smart_resize within a per-frame budget that shrinks as frames grow (``total_pixels``).
``second_per_grid_t`` = temporal patch / sampled fps: Qwen2.5-VL's mRoPE time step.
Limits are checked on the container's header and packet count before any frame is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from tritonvl.handlers.errors import InvalidArgument
from tritonvl.handlers.params import PreprocessParams
from tritonvl.handlers.preprocess.images import ImageLimits, decode_image, image_bytes

PART_KEYS = ("fps", "num_frames", "nframes", "max_frames", "min_pixels", "max_pixels", "total_pixels")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[^,;]*)*?;base64,", re.IGNORECASE)


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
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    total_pixels: int = 24576 * 28 * 28


def video_limits_from_params(p: PreprocessParams) -> VideoLimits:
    return VideoLimits(p.max_videos_per_request, p.max_video_bytes, p.max_video_seconds, p.max_video_frames,
                       p.video_fps, p.video_min_frames, p.video_max_frames, p.video_min_pixels,
                       p.video_max_pixels, p.video_total_pixels)


@dataclass(frozen=True)
class Geometry:
    """The model's patch layout and normalization (from its image processor)."""

    patch: int
    merge: int
    temporal: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class VideoRows:
    pixel_values: np.ndarray  # float32 [t * h * w patches, 3 * temporal * patch * patch]
    grid: np.ndarray  # int64 [3]: t, h, w in patches
    second_per_grid_t: float


@dataclass(frozen=True)
class Source:
    """One video of a request: its element (bytes, base64, data URI, or JSON list of frames) and the
    part's own sampling keys."""

    item: object
    options: dict
    where: str


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


def load_video(src: Source, limits: VideoLimits, images: ImageLimits, geo: Geometry) -> VideoRows:
    """Decode, sample, resize and patchify one video; InvalidArgument names what is wrong with it."""
    opts, where = src.options, src.where
    frames_json = _frame_list(src.item, where)
    if frames_json is not None:
        frames, fps = _frames_from_list(frames_json, where, limits, images)
        n = _ceil(len(frames), geo.temporal)  # a frame list is taken whole (padded with its last frame)
        if "num_frames" in opts:
            n = min(n, _round(opts["num_frames"], geo.temporal) or geo.temporal)
        idx = np.linspace(0, len(frames) - 1, n).round().astype(int) if n < len(frames) else None
        frames = [frames[i] for i in idx] if idx is not None else frames + [frames[-1]] * (n - len(frames))
        if any(f.shape != frames[0].shape for f in frames):
            raise InvalidArgument(f"{where}: frames of different sizes")
        size = target_size(*frames[0].shape[:2], len(frames), opts, limits, geo, where)
        frames = [_resized(f, size) for f in frames]
        sample_fps = float(opts.get("fps", limits.fps))
    else:
        frames, sample_fps = _decode(_video_bytes(src.item, where, limits), where, opts, limits, images, geo)
    video = np.stack(frames).astype(np.float32)  # [T, H, W, 3]
    video = (video / 255.0 - np.asarray(geo.mean, np.float32)) / np.asarray(geo.std, np.float32)
    rows, grid = patchify(video.transpose(0, 3, 1, 2), geo.patch, geo.merge, geo.temporal)
    return VideoRows(rows, grid, geo.temporal / sample_fps)


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


def _resized(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.shape[:2] == size:
        return frame
    return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))


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
        n = _round(opts["num_frames"], temporal)
    else:
        if not video_fps:
            raise InvalidArgument(f"{where}: the video states no frame rate: give num_frames")
        fps = opts.get("fps", limits.fps)
        low = _ceil(limits.min_frames, temporal)
        high = _floor(min(opts.get("max_frames", limits.max_sampled), limits.max_sampled, total), temporal)
        n = _floor(min(max(total / video_fps * fps, low), high, total), temporal)
    if not temporal <= n <= total:
        raise InvalidArgument(f"{where}: {n} frames to sample from a video of {total} (at least {temporal})")
    return n


def _decode(data: bytes, where: str, opts: dict, limits: VideoLimits, images: ImageLimits,
            geo: Geometry) -> tuple[list, float]:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.video:
                raise InvalidArgument(f"{where}: no video stream in the data")
            stream = container.streams.video[0]
            seconds = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                       else (container.duration or 0) / 1_000_000)
            if seconds > limits.max_seconds:
                raise InvalidArgument(f"{where}: {seconds:.1f} s is longer than the {limits.max_seconds:g} s limit")
            if stream.width * stream.height > images.max_pixels:  # before decoding: max_image_pixels per frame
                raise InvalidArgument(f"{where}: {stream.width}x{stream.height} frames are over the "
                                      f"{images.max_pixels}-pixel limit")
            total = 0
            for packet in container.demux(stream):  # count without decoding
                if packet.size:
                    total += 1
                    if total > limits.max_frames:
                        raise InvalidArgument(f"{where}: more than {limits.max_frames} frames")
            if total == 0:
                raise InvalidArgument(f"{where}: the video has no frames")
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else (total / seconds if seconds else None)
            n = sample_count(total, video_fps, opts, limits, geo.temporal, where)
        wanted = np.linspace(0, total - 1, n).round().astype(int)
        wanted_set, picked, size = set(wanted.tolist()), {}, None
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i > wanted[-1]:
                    break
                if i in wanted_set:  # resized at once: only the sampled frames, at their final size, are kept
                    rgb = frame.to_ndarray(format="rgb24")
                    size = size or target_size(*rgb.shape[:2], n, opts, limits, geo, where)
                    picked[i] = _resized(rgb, size)
    except InvalidArgument:
        raise
    except MemoryError:
        raise InvalidArgument(f"{where}: too large to decode") from None
    except Exception as exc:  # noqa: BLE001 -- any demuxer/decoder fault on untrusted bytes is the data's
        raise InvalidArgument(f"{where}: not a decodable video ({type(exc).__name__}: {exc})") from None
    if not picked:
        raise InvalidArgument(f"{where}: no frame could be decoded")
    frames, last = [], None
    for i in wanted.tolist():  # a frame the decoder skipped (damaged stream) repeats the one before
        last = picked.get(i, last)
        if last is None:
            raise InvalidArgument(f"{where}: frame {i} could not be decoded")
        frames.append(last)
    return frames, n / total * video_fps if video_fps else limits.fps


def _video_bytes(item, where: str, limits: VideoLimits) -> bytes:
    if isinstance(item, str):
        item = item.encode("utf-8")
    if not item:
        raise InvalidArgument(f"{where}: empty video")
    data = item
    if item.isascii():
        text = item.strip()
        m = _DATA_URI.match(text[:256].decode("ascii"))
        if text[:5].lower() == b"data:" and m is None:
            raise InvalidArgument(f"{where}: data URI must be of the form data:video/<type>;base64,<data>")
        if m is not None:
            if m.group("mime") and not m.group("mime").lower().startswith(("video/", "image/gif")):
                raise InvalidArgument(f"{where}: data URI media type {m.group('mime')!r} is not a video")
            text = text[m.end():]
        if re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
            raise InvalidArgument(f"{where}: URLs are not accepted for videos; send the bytes, base64 or a data: URI")
        if len(text) > limits.max_bytes * 4 // 3 + 1024:
            raise InvalidArgument(f"{where}: larger than the {limits.max_bytes}-byte limit")
        try:
            data = base64.b64decode(re.sub(rb"\s+", b"", text), validate=True)
        except (binascii.Error, ValueError):
            if m is not None:
                raise InvalidArgument(f"{where}: the data URI holds invalid base64") from None
            data = item  # raw bytes that happen to be ASCII: the decoder judges them
    if not data:
        raise InvalidArgument(f"{where}: empty video")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"{where}: {len(data)} bytes is larger than the {limits.max_bytes}-byte limit")
    return data


def _frame_list(item, where: str) -> list | None:
    if isinstance(item, list):
        return item
    head = item.lstrip()[:1] if isinstance(item, (bytes, str)) else b""
    if head not in (b"[", "["):
        return None
    try:
        frames = json.loads(item)
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{where}: a frame list must be a JSON array of base64 or data: URI images") from None
    if not isinstance(frames, list):
        raise InvalidArgument(f"{where}: a frame list must be a JSON array")
    return frames


def _frames_from_list(frames: list, where: str, limits: VideoLimits, images: ImageLimits) -> tuple[list, None]:
    if not frames:
        raise InvalidArgument(f"{where}: the frame list is empty")
    if len(frames) > limits.max_frames:
        raise InvalidArgument(f"{where}: {len(frames)} frames is over the {limits.max_frames}-frame limit")
    out = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, str) or not frame:
            raise InvalidArgument(f"{where}[{i}]: expected a base64 or data: URI image")
        try:
            img = decode_image(image_bytes(frame, i, replace(images, url_allowlist=())), i, images)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}[{i}]: {exc}".replace(f"image[{i}]: ", "")) from None
        out.append(np.asarray(img))
    return out, None


def _round(n: float, k: int) -> int:
    return round(n / k) * k


def _ceil(n: float, k: int) -> int:
    return math.ceil(n / k) * k


def _floor(n: float, k: int) -> int:
    return math.floor(n / k) * k


def video_geometry(image_processor) -> Geometry:
    """The model's patch layout and normalization, as its image processor has them."""
    p = image_processor
    return Geometry(int(p.patch_size), int(p.merge_size), int(p.temporal_patch_size),
                    tuple(float(x) for x in p.image_mean), tuple(float(x) for x in p.image_std))


def load_videos(found: list[tuple[object, dict, str]], family: str, limits: VideoLimits, images: ImageLimits,
                geo: Geometry) -> list[VideoRows]:
    """Every video of a request: (element, its message part, where) in prompt order."""
    if not found:
        return []
    if family == "qwen3_vl":  # its prompt interleaves a timestamp before each temporal patch
        raise InvalidArgument("video: not supported for Qwen3-VL models yet (images are); send frames as images")
    if len(found) > limits.max_videos:
        raise InvalidArgument(f"video: {len(found)} videos is over the limit of {limits.max_videos} per request")
    return [load_video(Source(item, options_of(part, where, limits), where), limits, images, geo)
            for item, part, where in found]


def in_prompt_order(ids: np.ndarray, info, pixel_values: np.ndarray, grid: np.ndarray,
                    clips: list[VideoRows]) -> tuple[np.ndarray, np.ndarray]:
    """Image rows and video rows merged in the order their placeholders take in ``ids``."""
    image_rows = np.split(pixel_values, np.cumsum([int(np.prod(g)) for g in grid])[:-1]) if len(grid) else []
    items = {info.image_token_id: iter(zip(image_rows, grid)),
             info.video_token_id: iter((c.pixel_values, c.grid) for c in clips)}
    positions = np.flatnonzero(np.isin(ids, list(items)))
    rows, grids, i = [], [], 0
    while i < positions.shape[0]:
        r, g = next(items[int(ids[positions[i]])])
        rows.append(r)
        grids.append(g)
        i += int(np.prod(g)) // info.merge_unit
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32), np.stack(grids).astype(np.int64)
