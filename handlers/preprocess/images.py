"""Image intake: bytes, base64 or data URI in (an http(s) URL only for allow-listed hosts, see
urlfetch); a validated RGB ``PIL.Image`` out.

Limits are checked on the header before any pixel is decoded (Pillow only warns below ~179 M
pixels), only the allowed formats' parsers see the bytes, and every mode is converted to RGB the
same way. docs/SECURITY.md lists the rules.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from tritonvl.client.rules.errors import InvalidArgument, checked_text
from tritonvl.handlers.params import IMAGE_FORMATS, PreprocessParams

ALLOWED_FORMATS = IMAGE_FORMATS
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's smart_resize refuses more


@dataclass(frozen=True)
class ImageLimits:
    """What one request may bring (config parameters of `preprocess`, see limits_from_params)."""

    max_bytes: int = 20 * 1024 * 1024  # encoded bytes per image
    max_pixels: int = 40_000_000  # per image, from the header, before decoding
    max_images: int = 8  # per request
    formats: tuple[str, ...] = ALLOWED_FORMATS
    max_prompt_bytes: int = 1024 * 1024  # UTF-8 bytes of the request's text, before tokenizing
    url_allowlist: tuple[str, ...] = ()  # hosts whose http(s) image URLs are fetched; empty = URLs off
    url_timeout_s: float = 10.0
    url_allow_private: bool = False  # allow-listed hosts may resolve to RFC 1918 / unique-local addresses
    url_allow_loopback: bool = False  # ... or to loopback (tests, a media server on this machine)


_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,", re.IGNORECASE)
_URL = re.compile(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_SPACE = re.compile(rb"\s+")
# Raw image data is (practically always) not ASCII; these formats may start with ASCII bytes.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")


def image_bytes(item: bytes | str, index: int, limits: ImageLimits) -> bytes:
    """Raw encoded bytes from one `image` element: raw bytes, base64 text, a data: URI, or an
    http(s) URL of an allow-listed host (URLs are refused unless ``limits.url_allowlist``)."""
    where = f"image[{index}]"
    if isinstance(item, str):
        item = checked_text(item, where).encode("utf-8")  # a JSON string may hold lone surrogates
    if not item:
        raise InvalidArgument(f"{where}: empty image")
    if not item.isascii():
        return _sized(item, where, limits)
    text = item.strip()
    if text[:5].lower() == b"data:":
        m = _DATA_URI.match(text[:256].decode("ascii"))
        if m is None or not m.group("b64"):
            raise InvalidArgument(f"{where}: data URI must be of the form data:image/<type>;base64,<data>")
        if m.group("mime") and not m.group("mime").lower().startswith("image/"):
            raise InvalidArgument(f"{where}: data URI media type {m.group('mime')!r} is not an image")
        text = text[m.end():]
    elif _URL.match(text):
        if not limits.url_allowlist:
            scheme = text.split(b":", 1)[0].decode("ascii")
            raise InvalidArgument(f"{where}: {scheme} URLs are not accepted; send the image bytes, base64 "
                                  "or a data: URI")
        from tritonvl.handlers.preprocess.urlfetch import fetch_image

        return _sized(fetch_image(text.decode("ascii"), where, limits), where, limits)
    if len(text) > limits.max_bytes * 4 // 3 + 1024:
        raise InvalidArgument(f"{where}: larger than the {limits.max_bytes}-byte limit")
    try:
        data = base64.b64decode(_SPACE.sub(b"", text), validate=True)
    except (binascii.Error, ValueError):
        if item.startswith(_MAGIC):  # raw bytes of an (ASCII-looking) image
            return _sized(item, where, limits)
        raise InvalidArgument(f"{where}: not a known image format and not valid base64") from None
    return _sized(data, where, limits)


def _sized(data: bytes, where: str, limits: ImageLimits) -> bytes:
    if not data:
        raise InvalidArgument(f"{where}: empty image")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"{where}: {len(data)} bytes is larger than the {limits.max_bytes}-byte limit")
    return data


def decode_image(data: bytes, index: int, limits: ImageLimits, where: str | None = None) -> Image.Image:
    """Decode and normalize one image; raise InvalidArgument naming the problem.

    Only the header is read before the format, pixel and aspect checks; animated images give
    their first frame; EXIF orientation is applied.
    """
    where = where or f"image[{index}]"
    with _decoder_faults(where, limits):
        img = open_image(data, where, limits)
        img.seek(0)  # animated images: the first frame
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)


def open_image(data: bytes, where: str, limits: ImageLimits) -> Image.Image:
    """The image with only its header read (Pillow opens lazily), after the format, pixel and aspect
    checks: no pixel is decoded until ``load()``."""
    with _decoder_faults(where, limits), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # only the allowed formats' parsers ever see the bytes
        img = Image.open(io.BytesIO(data), formats=limits.formats)
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
        return img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied, from the header alone."""
    try:
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 -- a damaged EXIF block: decode_image judges the image
        turned = False
    return img.size[::-1] if turned else img.size


@contextlib.contextmanager
def _decoder_faults(where: str, limits: ImageLimits):
    """Pillow's faults on untrusted bytes as InvalidArgument naming ``where``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses far-too-large headers inside open(), before our own check sees the size
        raise InvalidArgument(f"{where}: over the {limits.max_pixels}-pixel limit, refused before decoding "
                              f"({exc})") from None
    except UnidentifiedImageError:
        raise InvalidArgument(f"{where}: not a recognizable image (corrupt, or not one of the allowed formats "
                              f"{', '.join(limits.formats)})") from None
    except MemoryError:
        raise InvalidArgument(f"{where}: too large to decode") from None
    except Exception as exc:  # noqa: BLE001 -- any decoder fault on untrusted bytes is the data's
        raise InvalidArgument(f"{where}: corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode; transparency is composited on white (as a viewer shows it)."""
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")  # a tRNS colour or palette alpha becomes a real alpha channel
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16/32-bit grey: scale to 8 bits instead of clipping at 255
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or float(arr.max(initial=0)) <= 65535 else float(arr.max())
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8"), mode="L")
    return img.convert("RGB")


def load_images(items: list, limits: ImageLimits) -> list[Image.Image]:
    return list(each_image(items, limits))


def each_image(items: list, limits: ImageLimits):
    """The images of a request, each decoded only when the one before has been taken (a caller that
    drops each before asking for the next holds one decoded image at a time); the count is checked
    before any is decoded."""
    if len(items) > limits.max_images:
        raise InvalidArgument(f"image: {len(items)} images is over the limit of {limits.max_images} per request")
    for i, item in enumerate(items):
        yield decode_image(image_bytes(item, i, limits), i, limits)


def limits_from_params(p: PreprocessParams) -> ImageLimits:
    """ImageLimits from the typed parameters of `preprocess` (handlers/params.py)."""
    return ImageLimits(max_bytes=p.max_image_bytes, max_pixels=p.max_image_pixels,
                       max_images=p.max_images_per_request, formats=p.image_formats,
                       max_prompt_bytes=p.max_prompt_bytes,
                       url_allowlist=tuple(h.lower() for h in p.image_url_allowlist),
                       url_timeout_s=p.image_url_timeout_s, url_allow_private=p.image_url_allow_private,
                       url_allow_loopback=p.image_url_allow_loopback)
