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
import re
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
from PIL import Image

from tritonvl.client.rules.errors import InvalidArgument, checked_text
from tritonvl.handlers.params import PreprocessParams
from tritonvl.handlers.preprocess.clipcache import ClipCache
from tritonvl.handlers.preprocess.images import ImageLimits, decode_image, image_bytes
from tritonvl.handlers.preprocess.video_rules import (
    Geometry,
    VideoLimits,
    ceil_to,
    options_of,
    patch_times,
    patchify,
    round_to,
    sample_count,
    target_size,
)

_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[^,;]*)*?;base64,", re.IGNORECASE)


def video_limits_from_params(p: PreprocessParams) -> VideoLimits:
    """Frame areas left unset stay None: the model's patch size decides them (``VideoLimits.resolved``)."""
    return VideoLimits(p.max_videos_per_request, p.max_video_bytes, p.max_video_seconds, p.max_video_frames,
                       p.video_fps, p.video_min_frames, p.video_max_frames, p.video_min_pixels,
                       p.video_max_pixels, p.video_total_pixels)


@dataclass
class VideoRows:
    pixel_values: np.ndarray  # float32 [t * h * w patches, 3 * temporal * patch * patch]
    grid: np.ndarray  # int64 [3]: t, h, w in patches
    second_per_grid_t: float
    frame_times: list[float]  # seconds into the video of each sampled frame (padded like the frames)

    def patch_seconds(self) -> list[float]:
        """Per temporal patch, seconds into the video: Qwen3-VL's ``<t seconds>``."""
        return patch_times(self.frame_times, len(self.frame_times) // int(self.grid[0]))


@dataclass(frozen=True)
class Source:
    """One video of a request: its element (bytes, base64, data URI, or JSON list of frames) and the
    part's own sampling keys."""

    item: object
    options: dict
    where: str


def load_video(src: Source, limits: VideoLimits, images: ImageLimits, geo: Geometry) -> VideoRows:
    """Decode, sample, resize and patchify one video; InvalidArgument names what is wrong with it."""
    opts, where = src.options, src.where
    frames_json = _frame_list(src.item, where)
    if frames_json is not None:
        frames, fps = _frames_from_list(frames_json, where, limits, images)
        n = ceil_to(len(frames), geo.temporal)  # a frame list is taken whole (padded with its last frame)
        if "num_frames" in opts:
            n = min(n, round_to(opts["num_frames"], geo.temporal) or geo.temporal)
        idx = (np.linspace(0, len(frames) - 1, n).round().astype(int).tolist() if n < len(frames)
               else list(range(len(frames))) + [len(frames) - 1] * (n - len(frames)))
        frames = [frames[i] for i in idx]
        if any(f.shape != frames[0].shape for f in frames):
            raise InvalidArgument(f"{where}: frames of different sizes")
        size = target_size(*frames[0].shape[:2], len(frames), opts, limits, geo, where)
        frames = [_resized(f, size) for f in frames]
        sample_fps = float(opts.get("fps", limits.fps))
        times = [i / sample_fps for i in idx]
    else:
        frames, sample_fps, times = _decode(_video_bytes(src.item, where, limits, images), where, opts, limits, images, geo)
    video = np.stack(frames).astype(np.float32)  # [T, H, W, 3]
    video = (video / 255.0 - np.asarray(geo.mean, np.float32)) / np.asarray(geo.std, np.float32)
    rows, grid = patchify(video.transpose(0, 3, 1, 2), geo.patch, geo.merge, geo.temporal)
    times += [times[-1]] * (-len(times) % geo.temporal)  # patchify pads with the last frame
    return VideoRows(rows, grid, geo.temporal / sample_fps, times)


def _resized(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.shape[:2] == size:
        return frame
    return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))


def _decode(data: bytes, where: str, opts: dict, limits: VideoLimits, images: ImageLimits,
            geo: Geometry) -> tuple[list, float, list[float]]:
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
    if not video_fps:  # only num_frames can sample a video without a rate: its frames as if at limits.fps
        return frames, limits.fps, [i / limits.fps for i in wanted.tolist()]
    return frames, n / total * video_fps, [i / video_fps for i in wanted.tolist()]


def _video_bytes(item, where: str, limits: VideoLimits, images: ImageLimits) -> bytes:
    """Container bytes from raw bytes, base64, a data: URI, or an allow-listed http(s) URL."""
    if isinstance(item, str):
        item = checked_text(item, where).encode("utf-8")  # a JSON string may hold lone surrogates
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
        if m is None and re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
            if not images.url_allowlist:
                raise InvalidArgument(f"{where}: URLs are not accepted for videos without an image_url_allowlist; "
                                      "send the video's bytes, base64 or a data: URI")
            from tritonvl.handlers.preprocess.urlfetch import fetch_image

            text = text.decode("ascii")
            data = fetch_image(text, where, images, max_bytes=limits.max_bytes, accept="video/*, image/gif")
            if not data:
                raise InvalidArgument(f"{where}: the URL answered with an empty body")
            return data
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


def video_geometry(image_processor) -> Geometry:
    """The model's patch layout and normalization, as its image processor has them."""
    p = image_processor
    return Geometry(int(p.patch_size), int(p.merge_size), int(p.temporal_patch_size),
                    tuple(float(x) for x in p.image_mean), tuple(float(x) for x in p.image_std))


def load_videos(found: list[tuple[object, dict, str]], limits: VideoLimits, images: ImageLimits,
                geo: Geometry, request_keys: dict | None = None, cache: ClipCache | None = None) -> list[VideoRows]:
    """Every video of a request: (element, its message part, where) in prompt order. ``limits``
    resolved (``VideoLimits.resolved``); ``request_keys``: sampling keys for every video (the
    request's ``mm_processor_kwargs``), under each part's own (a part's fps or num_frames replaces
    the request's either)."""
    if not found:
        return []
    if len(found) > limits.max_videos:
        raise InvalidArgument(f"video: {len(found)} videos is over the limit of {limits.max_videos} per request")
    shared = options_of(request_keys or {}, "mm_processor_kwargs", limits)
    clips = []
    for item, part, where in found:
        own = options_of(part, where, limits)
        if "fps" in own or "num_frames" in own:
            shared_here = {k: v for k, v in shared.items() if k not in ("fps", "num_frames")}
        else:
            shared_here = shared
        src = Source(item, {**shared_here, **own}, where)
        load = partial(load_video, src, limits, images, geo)
        clips.append(cache.get_or_load(item, src.options, load) if cache is not None else load())
    return clips


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
