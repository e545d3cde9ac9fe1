"""Image inputs: a path, bytes, a PIL image, a numpy array, a data URI or an http(s) URL -> encoded bytes.

The client never decodes files it is given as bytes or paths: the server validates and decodes
them (one set of rules). PIL is imported only for PIL images and arrays (encoded as PNG,
lossless). URLs are fetched by the client, with a timeout and a size cap, because the server
accepts only image data.
"""

from __future__ import annotations

import base64
import io
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Any  # Any: PIL.Image / numpy array

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class ImageOptions:
    """Limits for images the client reads or fetches."""

    max_bytes: int = 20 * 1024 * 1024  # the server's default cap
    fetch_timeout: float = 10.0


def describe_source(src: ImageSource) -> str:
    """A short name for messages: the path or URL, else the type."""
    if isinstance(src, (str, os.PathLike)):
        text = str(src)
        return text if not text.startswith("data:") else "data URI"
    return type(src).__name__


def load_image(src: ImageSource, options: ImageOptions = ImageOptions()) -> bytes | str:
    """Encoded image bytes, or a ``data:`` URI string passed through as given.

    Raises ImageError naming the source and the problem.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, str) and src.startswith("data:"):
        return src
    elif isinstance(src, str) and src.split("://", 1)[0].lower() in ("http", "https"):
        data = fetch_url(src, options)
    elif isinstance(src, (str, os.PathLike)):
        data = read_file(Path(src), options.max_bytes)
    elif _is_pil(src):
        data = _png(src)
    elif _is_array(src):
        data = _png(_array_to_pil(src))
    else:
        raise ImageError(f"image: unsupported type {type(src).__name__} (give a path, URL, bytes, PIL image or array)")
    if not data:
        raise ImageError(f"image {describe_source(src)}: empty")
    if len(data) > options.max_bytes:
        raise ImageError(f"image {describe_source(src)}: {len(data)} bytes is over the {options.max_bytes}-byte cap")
    return data


def for_http(item: bytes | str) -> str:
    """JSON-safe form: base64 text (data URIs unchanged)."""
    return item if isinstance(item, str) else base64.b64encode(item).decode("ascii")


def for_grpc(item: bytes | str) -> bytes:
    """Raw bytes (data URIs are sent as their text; the server decodes them)."""
    return item.encode("utf-8") if isinstance(item, str) else item


def fetch_url(url: str, options: ImageOptions) -> bytes:
    """GET an image with a timeout, reading at most ``max_bytes`` (+1 to detect more)."""
    request = urllib.request.Request(url, headers={"User-Agent": "tritonvl-client"})
    try:
        with urllib.request.urlopen(request, timeout=options.fetch_timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > options.max_bytes:
                raise ImageError(f"image {url}: {length} bytes is over the {options.max_bytes}-byte cap")
            data = response.read(options.max_bytes + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageError(f"image {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"image {url}: could not fetch ({reason})") from None
    if len(data) > options.max_bytes:
        raise ImageError(f"image {url}: over the {options.max_bytes}-byte cap")
    return data


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, case-insensitive), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_file(path: Path, max_bytes: int, error: type[Exception] = ImageError, what: str = "image") -> bytes:
    """A local file's bytes, its size checked against ``max_bytes`` before reading; ``error`` names it."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{what} {path}: {size} bytes is over the {max_bytes}-byte cap")
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{what} {path}: is a directory") from None
    except PermissionError:
        raise error(f"{what} {path}: permission denied") from None
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror or exc}") from None


def _is_pil(obj: object) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(obj).__mro__)


def _is_array(obj: object) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "shape") and hasattr(obj, "dtype")


def _array_to_pil(arr):
    """HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA) uint8 arrays; floats in [0, 1] are scaled."""
    import numpy as np
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"image array: shape {a.shape} is not HxW, HxWx3 or HxWx4")
    if a.dtype.kind == "f":
        a = np.clip(np.nan_to_num(a) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ImageError(f"image array: {a.dtype} values outside 0..255")
        a = a.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def _png(img) -> bytes:
    buf = io.BytesIO()
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I"):
        img = img.convert("RGB")
    img.save(buf, format="PNG")
    return buf.getvalue()
