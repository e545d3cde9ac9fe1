"""Image intake: bytes, base64 or data URI in; a validated RGB ``PIL.Image`` out.

Limits are checked on the header before any pixel is decoded (Pillow only warns below ~179 M
pixels), formats come from an allow-list, and every mode is converted to RGB the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidArgument

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's smart_resize refuses more


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 8
    formats: tuple[str, ...] = ALLOWED_FORMATS


_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,", re.I)
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")


def image_bytes(item: bytes | str, index: int, limits: ImageLimits) -> bytes:
    """Raw encoded bytes from one `image` element: raw bytes, base64 text or a data: URI."""
    where = f"image[{index}]"
    if isinstance(item, str):
        item = item.encode("utf-8")
    if not item:
        raise InvalidArgument(f"{where}: empty image")
    if item.startswith(_MAGIC):
        data = item
    else:
        text = item.strip()
        if text[:5].lower() == b"data:":
            m = _DATA_URI.match(text.decode("ascii", "replace"))
            if m is None or not m.group("b64"):
                raise InvalidArgument(f"{where}: data URI must be of the form data:image/<type>;base64,<data>")
            if m.group("mime") and not m.group("mime").lower().startswith("image/"):
                raise InvalidArgument(f"{where}: data URI media type {m.group('mime')!r} is not an image")
            text = text[m.end():]
        elif re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
            scheme = text.split(b":", 1)[0].decode("ascii", "replace")
            raise InvalidArgument(f"{where}: {scheme} URLs are not accepted; send the image bytes, base64 or a data: URI")
        if len(text) > limits.max_bytes * 4 // 3 + 8:
            raise InvalidArgument(f"{where}: larger than the {limits.max_bytes}-byte limit")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"{where}: not a known image format and not valid base64") from None
    if not data:
        raise InvalidArgument(f"{where}: empty image")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"{where}: {len(data)} bytes is larger than the {limits.max_bytes}-byte limit")
    return data


def decode_image(data: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """Decode and normalize one image; raise InvalidArgument naming the problem."""
    where = f"image[{index}]"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in limits.formats:
                raise InvalidArgument(f"{where}: format {fmt} is not allowed (allowed: {', '.join(limits.formats)})")
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidArgument(f"{where}: empty image ({width}x{height})")
            if width * height > limits.max_pixels:
                raise InvalidArgument(
                    f"{where}: {width}x{height} = {width * height} pixels is over the {limits.max_pixels}-pixel limit")
            if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
                raise InvalidArgument(
                    f"{where}: aspect ratio {width}x{height} is over Qwen2.5-VL's limit of {MAX_ASPECT_RATIO}:1")
            img.seek(0)  # animated images: the first frame
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument(f"{where}: refused as a decompression bomb") from None
    except UnidentifiedImageError:
        raise InvalidArgument(f"{where}: not a recognizable image (corrupt or unsupported data)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"{where}: corrupt or truncated image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode; transparency is composited on white (as a viewer shows it)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16/32-bit grey: scale to 8 bits instead of clipping
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype("uint8"), mode="L")
    return img.convert("RGB")


def load_images(items: list, limits: ImageLimits) -> list[Image.Image]:
    if len(items) > limits.max_images:
        raise InvalidArgument(f"image: {len(items)} images is over the limit of {limits.max_images} per request")
    return [decode_image(image_bytes(item, i, limits), i, limits) for i, item in enumerate(items)]


def content_hash(*arrays) -> bytes:
    """Content key of an image's processed pixels (for the embedding and prefix caches)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(memoryview(a).cast("B") if hasattr(a, "__array__") else bytes(a))
    return h.digest()


def limits_from_params(param) -> ImageLimits:
    """ImageLimits from config parameters (``param(name, default) -> str``)."""
    d = ImageLimits()
    formats = tuple(f.strip().upper() for f in param("image_formats", ",".join(d.formats)).split(",") if f.strip())
    return ImageLimits(max_bytes=int(param("max_image_bytes", str(d.max_bytes))),
                       max_pixels=int(param("max_image_pixels", str(d.max_pixels))),
                       max_images=int(param("max_images_per_request", str(d.max_images))),
                       formats=formats)
