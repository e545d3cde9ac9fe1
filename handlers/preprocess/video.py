"""Video intake: encoded bytes (MP4, WebM, GIF, ... through PyAV's bundled FFmpeg) or a JSON list of
frames in; sampled, resized, normalized and patchified rows out (Qwen's video layout).

Sampling follows qwen-vl-utils' rules (our own code): by ``num_frames`` (rounded to the temporal
patch) or by ``fps`` (total / video fps * fps, clamped to [min_frames, max_frames] and the video's own
frames, floored to the temporal patch), frames picked evenly over the whole video; each frame resized
by Qwen's smart_resize within a per-frame budget that shrinks as frames grow (``total_pixels``).
``second_per_grid_t`` = temporal patch / sampled fps: Qwen2.5-VL's mRoPE time step.

Bounded work: limits are checked on the container's header and packet count (a frame list: on each
sampled frame's image header) before any frame is decoded, and so are the request's decoded-pixel
budget (frames decoded x frame area) and its video tokens (``DecodeBudget``). Frames are decoded one
at a time, each resized to its final size at once; a frame list decodes only its sampled frames; a
container decodes up to its last sampled frame and converts only the sampled ones to RGB; the
clock (``video_decode_timeout_s``) is checked between frames.
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
from tritonvl.handlers.preprocess.images import (
    ImageLimits,
    decode_image,
    image_bytes,
    open_image,
    upright_size,
)
from tritonvl.handlers.preprocess.video_rules import (
    DecodeBudget,
    Geometry,
    VideoLimits,
    ceil_to,
    options_of,
    patch_times,
    patchify,
    round_to,
    sample_count,
    target_size,
    video_tokens,
)

_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[^,;]*)*?;base64,", re.IGNORECASE)
_URL = re.compile(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def video_limits_from_params(p: PreprocessParams) -> VideoLimits:
    """Frame areas left unset stay None: the model's patch size decides them (``VideoLimits.resolved``)."""
    return VideoLimits(p.max_videos_per_request, p.max_video_bytes, p.max_video_seconds, p.max_video_frames,
                       p.video_fps, p.video_min_frames, p.video_max_frames, p.video_min_pixels,
                       p.video_max_pixels, p.video_total_pixels, max_decoded_pixels=p.max_video_decoded_pixels,
                       decode_timeout_s=p.video_decode_timeout_s)


@dataclass
class VideoRows:
    pixel_values: np.ndarray  # float32 [t * h * w patches, 3 * temporal * patch * patch]
    grid: np.ndarray  # int64 [3]: t, h, w in patches
    second_per_grid_t: float
    frame_times: list[float]  # seconds into the video of each sampled frame (padded like the frames)
    size: tuple[int, int] = (0, 0)  # (width, height) of the video's frames as decoded, before resizing

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


def load_video(src: Source, limits: VideoLimits, images: ImageLimits, geo: Geometry,
               budget: DecodeBudget | None = None) -> VideoRows:
    """Decode, sample, resize and patchify one video; InvalidArgument names what is wrong with it.
    ``budget``: what the request's videos may still spend (default: this video alone)."""
    opts, where = src.options, src.where
    budget = budget or DecodeBudget(limits)
    frames_json = _frame_list(src.item, where)
    if frames_json is not None:
        frames, sample_fps, times, size = _decode_list(frames_json, where, opts, limits, images, geo, budget)
    else:
        data = _video_bytes(src.item, where, limits, images)
        frames, sample_fps, times, size = _decode(data, where, opts, limits, images, geo, budget)
    rows, grid = _rows(frames, geo)
    times += [times[-1]] * (-len(times) % geo.temporal)  # patchify pads with the last frame
    return VideoRows(rows, grid, geo.temporal / sample_fps, times, size)


def _rows(frames: list[np.ndarray], geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Normalized, patchified rows of the [H, W, 3] uint8 frames, one temporal patch at a time into
    one array (the values of normalizing and patchifying the whole stack at once, without its
    float copies of every frame)."""
    frames = frames + [frames[-1]] * (-len(frames) % geo.temporal)  # padded with the last frame
    height, width = frames[0].shape[:2]
    per = (height // geo.patch) * (width // geo.patch)
    t = len(frames) // geo.temporal
    out = np.empty((t * per, 3 * geo.temporal * geo.patch * geo.patch), np.float32)
    mean, std = np.asarray(geo.mean, np.float32), np.asarray(geo.std, np.float32)
    for g in range(t):
        chunk = np.stack(frames[g * geo.temporal:(g + 1) * geo.temporal]).astype(np.float32)
        chunk = (chunk / 255.0 - mean) / std
        out[g * per:(g + 1) * per] = patchify(chunk.transpose(0, 3, 1, 2), geo.patch, geo.merge, geo.temporal)[0]
    return out, np.array([t, height // geo.patch, width // geo.patch], np.int64)


def _resized(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.shape[:2] == size:
        return frame
    return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))


def _decode_list(frames: list, where: str, opts: dict, limits: VideoLimits, images: ImageLimits, geo: Geometry,
                 budget: DecodeBudget) -> tuple[list, float, list[float], tuple[int, int]]:
    """A frame list's sampled frames, their sample rate and times, and the frames' (width, height):
    which ones from the list's length alone, every sampled frame's image header checked (and the
    request's budget charged) before any is decoded, then each decoded and resized in turn;
    unsampled frames are never decoded."""
    if not frames:
        raise InvalidArgument(f"{where}: the frame list is empty")
    if len(frames) > limits.max_frames:
        raise InvalidArgument(f"{where}: {len(frames)} frames is over the {limits.max_frames}-frame limit")
    for i, frame in enumerate(frames):
        if not isinstance(frame, str) or not frame:
            raise InvalidArgument(f"{where}[{i}]: expected a base64 or data: URI image")
    n = ceil_to(len(frames), geo.temporal)  # a frame list is taken whole (padded with its last frame)
    if "num_frames" in opts:
        n = min(n, round_to(opts["num_frames"], geo.temporal) or geo.temporal)
    elif n > limits.max_sampled:
        raise InvalidArgument(f"{where}: a frame list of {len(frames)} frames is over the video_max_frames limit "
                              f"({limits.max_sampled} frames sampled); send fewer frames, or num_frames to sample them")
    idx = (np.linspace(0, len(frames) - 1, n).round().astype(int).tolist() if n < len(frames)
           else list(range(len(frames))) + [len(frames) - 1] * (n - len(frames)))
    needed = sorted(set(idx))
    no_urls = replace(images, url_allowlist=())
    data, sizes = {}, {}
    for i in needed:  # headers only: Pillow opens lazily
        budget.check_time(where)
        try:
            data[i] = image_bytes(frames[i], i, no_urls)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}[{i}]: {exc}".replace(f"image[{i}]: ", "")) from None
        sizes[i] = upright_size(open_image(data[i], f"{where}[{i}]", images))
    width, height = sizes[needed[0]]
    for i in needed:
        if sizes[i] != (width, height):
            raise InvalidArgument(f"{where}: frames of different sizes ({where}[{needed[0]}] is {width}x{height}, "
                                  f"{where}[{i}] is {sizes[i][0]}x{sizes[i][1]})")
    budget.spend_pixels(len(needed) * width * height, where, f"{len(needed)} frames of {width}x{height}")
    size = target_size(height, width, n, opts, limits, geo, where)
    budget.spend_tokens(video_tokens(n, size, geo), where)
    picked = {}
    for i in needed:
        budget.check_time(where)
        img = decode_image(data.pop(i), i, images, where=f"{where}[{i}]")
        if img.size != (width, height):  # the header's size, so only a damaged file differs
            raise InvalidArgument(f"{where}: frames of different sizes ({where}[{i}] decodes to "
                                  f"{img.size[0]}x{img.size[1]}, not {width}x{height})")
        picked[i] = np.asarray(img if img.size == (size[1], size[0]) else
                               img.resize((size[1], size[0]), Image.BICUBIC))  # resized at once
        del img
    budget.check_time(where)
    sample_fps = float(opts.get("fps", limits.fps))
    return [picked[i] for i in idx], sample_fps, [i / sample_fps for i in idx], (width, height)


def _decode(data: bytes, where: str, opts: dict, limits: VideoLimits, images: ImageLimits,
            geo: Geometry, budget: DecodeBudget) -> tuple[list, float, list[float], tuple[int, int]]:
    """A video file's sampled frames, their sample rate and times, and the frames' (width, height)."""
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
            width, height = stream.width or 0, stream.height or 0
            if width * height > images.max_pixels:  # before decoding: max_image_pixels per frame
                raise InvalidArgument(f"{where}: {width}x{height} frames are over the "
                                      f"{images.max_pixels}-pixel limit (max_image_pixels)")
            total = 0
            for packet in container.demux(stream):  # count without decoding
                if packet.size:
                    total += 1
                    if total > limits.max_frames:
                        raise InvalidArgument(f"{where}: more than {limits.max_frames} frames")
                    if total % 256 == 0:
                        budget.check_time(where)
            if total == 0:
                raise InvalidArgument(f"{where}: the video has no frames")
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else (total / seconds if seconds else None)
            n = sample_count(total, video_fps, opts, limits, geo.temporal, where)
        wanted = np.linspace(0, total - 1, n).round().astype(int)
        last = int(wanted[-1])
        # every frame up to the last sampled one is decoded (the codec needs them), at the header's size
        budget.spend_pixels((last + 1) * width * height, where, f"{last + 1} frames of {width}x{height}")
        size = target_size(height, width, n, opts, limits, geo, where) if width and height else None
        if size is not None:
            budget.spend_tokens(video_tokens(n, size, geo), where)
        wanted_set, picked, seen = set(wanted.tolist()), {}, None
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                budget.check_time(where)
                if i > last:
                    break
                if (frame.width, frame.height) != (width, height):  # the header said otherwise (or nothing)
                    if frame.width * frame.height > images.max_pixels:
                        raise InvalidArgument(f"{where}: frame {i} is {frame.width}x{frame.height}, over the "
                                              f"{images.max_pixels}-pixel limit (max_image_pixels)")
                    if width and height:
                        raise InvalidArgument(f"{where}: frame {i} is {frame.width}x{frame.height}, not the "
                                              f"{width}x{height} of the stream's header")
                    budget.spend_pixels(frame.width * frame.height, where, f"frame {i} ({frame.width}x"
                                        f"{frame.height})")
                if i in wanted_set:  # resized at once: only the sampled frames, at their final size, are kept
                    rgb = frame.to_ndarray(format="rgb24")
                    seen = seen or (rgb.shape[1], rgb.shape[0])
                    if size is None:
                        size = target_size(*rgb.shape[:2], n, opts, limits, geo, where)
                        budget.spend_tokens(video_tokens(n, size, geo), where)
                    picked[i] = _resized(rgb, size)
                    del rgb
    except InvalidArgument:
        raise
    except MemoryError:
        raise InvalidArgument(f"{where}: too large to decode") from None
    except Exception as exc:  # noqa: BLE001 -- any demuxer/decoder fault on untrusted bytes is the data's
        raise InvalidArgument(f"{where}: not a decodable video ({type(exc).__name__}: {exc})") from None
    if not picked:
        raise InvalidArgument(f"{where}: no frame could be decoded")
    frames, last_frame = [], None
    for i in wanted.tolist():  # a frame the decoder skipped (damaged stream) repeats the one before
        last_frame = picked.get(i, last_frame)
        if last_frame is None:
            raise InvalidArgument(f"{where}: frame {i} could not be decoded")
        frames.append(last_frame)
    if not video_fps:  # only num_frames can sample a video without a rate: its frames as if at limits.fps
        return frames, limits.fps, [i / limits.fps for i in wanted.tolist()], seen
    return frames, n / total * video_fps, [i / video_fps for i in wanted.tolist()], seen


def url_of(item) -> str | None:
    """The http(s)-looking URL an element holds (any scheme://: the fetch refuses the others), else None."""
    if isinstance(item, list):
        return None
    head = item[:4096]
    if isinstance(head, str):
        head = head.encode("utf-8", "surrogatepass")
    head = head.lstrip()
    if not head.isascii() or not _URL.match(head):
        return None
    text = item.strip()
    text = text if isinstance(text, str) else text.decode("ascii", "replace")
    return text if text.isascii() else None


def fetch_video(url: str, where: str, limits: VideoLimits, images: ImageLimits) -> bytes:
    """The body of an http(s) video URL of an allow-listed host (urlfetch's rules), at most max_video_bytes."""
    if not images.url_allowlist:
        raise InvalidArgument(f"{where}: URLs are not accepted for videos without an image_url_allowlist; "
                              "send the video's bytes, base64 or a data: URI")
    from tritonvl.handlers.preprocess.urlfetch import fetch_image

    data = fetch_image(url, where, images, max_bytes=limits.max_bytes, accept="video/*, image/gif")
    if not data:
        raise InvalidArgument(f"{where}: the URL answered with an empty body")
    return data


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
        if m is None and _URL.match(text):
            return fetch_video(text.decode("ascii"), where, limits, images)
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


def video_geometry(image_processor) -> Geometry:
    """The model's patch layout and normalization, as its image processor has them."""
    p = image_processor
    return Geometry(int(p.patch_size), int(p.merge_size), int(p.temporal_patch_size),
                    tuple(float(x) for x in p.image_mean), tuple(float(x) for x in p.image_std))


def load_videos(found: list[tuple[object, dict, str]], limits: VideoLimits, images: ImageLimits,
                geo: Geometry, request_keys: dict | None = None, cache: ClipCache | None = None,
                max_tokens: int | None = None) -> list[VideoRows]:
    """Every video of a request: (element, its message part, where) in prompt order. ``limits``
    resolved (``VideoLimits.resolved``); ``request_keys``: sampling keys for every video (the
    request's ``mm_processor_kwargs``), under each part's own (a part's fps or num_frames replaces
    the request's either). One ``DecodeBudget`` for them all (``max_tokens``: the prompt's room).
    A URL is fetched first, so the cache keys its video by the content it got, not by the URL."""
    if not found:
        return []
    if len(found) > limits.max_videos:
        raise InvalidArgument(f"video: {len(found)} videos is over the limit of {limits.max_videos} per request")
    shared = options_of(request_keys or {}, "mm_processor_kwargs", limits)
    budget = DecodeBudget(limits, max_tokens)
    clips = []
    for item, part, where in found:
        own = options_of(part, where, limits)
        if "fps" in own or "num_frames" in own:
            shared_here = {k: v for k, v in shared.items() if k not in ("fps", "num_frames")}
        else:
            shared_here = shared
        url = url_of(item)
        if url is not None:
            item = fetch_video(url, where, limits, images)
        src = Source(item, {**shared_here, **own}, where)
        load = partial(load_video, src, limits, images, geo, budget)
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
