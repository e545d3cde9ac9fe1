"""Video inputs: a path, bytes, a ``data:video/...`` URI, or a list of frames -> one ``video`` element.

As with images, the client never decodes a video: the server samples, decodes and checks it (one set
of rules, docs/VIDEO.md). A list of frames (paths, bytes, PIL images, arrays or data URIs; each read
as an image) becomes the JSON list of base64 frames the server takes as a video. http(s) URLs are
fetched by the client, as image URLs are (with a timeout and the byte cap), so they work whether or
not the server allow-lists the host; other schemes (file, ftp, rtsp, ...) are refused.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageError, VideoError
from .images import ImageOptions, fetch_url, load_image, read_file

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | list | tuple
_URL_SCHEMES = ("http", "https", "ftp", "rtsp", "rtmp", "file")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi")


@dataclass(frozen=True)
class VideoOptions:
    """Limits for videos the client reads: ``max_bytes`` per video (container bytes, or the frames of a
    list together), ``max_frames`` per frame list. The server's defaults (docs/VIDEO.md)."""

    max_bytes: int = 100 * 1024 * 1024
    max_frames: int = 4096
    fetch_timeout: float = 60.0  # per video URL


def describe_video(src: Any) -> str:
    """A short name for messages: the path, else the type."""
    if isinstance(src, (str, os.PathLike)):
        text = str(src)
        return "data URI" if text.startswith("data:") else text if len(text) <= 200 else text[:60] + "..."
    return type(src).__name__


def load_video(src: VideoSource, options: VideoOptions = VideoOptions()) -> bytes | str:
    """Container bytes, a ``data:`` URI passed through as given, or a frame list as JSON text.

    Raises VideoError naming the source and the problem.
    """
    if isinstance(src, (list, tuple)):
        return _frame_list(src, options)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, str) and src[:5].lower() == "data:":
        return src
    elif _is_url(src) and src.split("://", 1)[0].lower() in ("http", "https"):
        try:
            data = fetch_url(src, ImageOptions(max_bytes=options.max_bytes, fetch_timeout=options.fetch_timeout))
        except ImageError as exc:
            raise VideoError(str(exc).replace("image ", "video ", 1)) from None
    elif _is_url(src):
        raise VideoError(f"video {src}: {src.split('://', 1)[0]} URLs are not accepted; give an http(s) URL, "
                         "a path or bytes")
    elif isinstance(src, (str, os.PathLike)):
        data = read_file(Path(src), options.max_bytes, VideoError, "video")
    else:
        raise VideoError(f"video: unsupported type {type(src).__name__} (give a path, bytes, a data: URI or a "
                         f"list of frames)")
    if not data:
        raise VideoError(f"video {describe_video(src)}: empty")
    if len(data) > options.max_bytes:
        raise VideoError(f"video {describe_video(src)}: {len(data)} bytes is over the {options.max_bytes}-byte cap")
    return data


def is_video_path(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def find_videos(folder: Path) -> list[Path]:
    """Video files under ``folder`` (recursive, by extension, case-insensitive), sorted. GIFs count as images."""
    return sorted(p for p in folder.rglob("*") if is_video_path(p) and p.is_file())


def _frame_list(frames: list | tuple, options: VideoOptions) -> str:
    """Each frame read as an image (within the whole video's byte cap) -> a JSON array of base64 / data URIs."""
    if not frames:
        raise VideoError("video: the frame list is empty")
    if len(frames) > options.max_frames:
        raise VideoError(f"video: {len(frames)} frames is over the {options.max_frames}-frame cap")
    out, total = [], 0
    for i, frame in enumerate(frames):
        if _is_url(frame) and frame.split("://", 1)[0].lower() not in ("http", "https"):
            raise VideoError(f"video frame {i}: {frame.split('://', 1)[0]} URLs are not accepted; give http(s) "
                             "URLs, paths or bytes")
        try:
            item = load_image(frame, ImageOptions(max_bytes=options.max_bytes, fetch_timeout=options.fetch_timeout))
        except ImageError as exc:
            raise VideoError(f"video frame {i}: {exc}") from None
        text = item if isinstance(item, str) else base64.b64encode(item).decode("ascii")
        total += len(text) * 3 // 4
        if total > options.max_bytes:
            raise VideoError(f"video: the frames are over the {options.max_bytes}-byte cap")
        out.append(text)
    return json.dumps(out)


def _is_url(src: object) -> bool:
    return isinstance(src, str) and "://" in src and src.split("://", 1)[0].lower() in _URL_SCHEMES
