"""Grounding: Qwen's boxes and points, read from an answer, put on the original image's pixels, drawn.

The families answer on different grids (Qwen's cookbooks; QwenLM/Qwen2.5-VL issues #676, #947):
Qwen2.5-VL in absolute pixels of the *resized* image the model saw, Qwen2-VL and Qwen3-VL on a
0-1000 grid over the image. The server says which, and both sizes, in ``result.media``
(docs/INTERFACE.md ``media_sizes``), so nothing here re-implements Qwen's resize.

>>> result = client.generate(grounding_prompt("the red car"), images=["street.jpg"])
>>> for item in ground(result.text, result.media):
...     print(item.label, item.bbox)          # original pixels
>>> draw("street.jpg", ground(result.text, result.media), "boxed.png")

Pillow only (no torch).
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .result import Media, MediaSize
from .rules.media import ABSOLUTE, RELATIVE_1000, coordinates_of

PROMPT = "Locate {target}, output its bbox coordinates using JSON format."  # Qwen2.5-VL's cookbook wording
# saturated, far-apart colours (boxes of one answer told apart; the label's background is the box's colour)
COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
          (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128))
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
# Qwen2-VL's own format: <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
# (the special tokens are gone when the server skips them: "label(x1,y1),(x2,y2)")
_QWEN2_BOX = re.compile(r"(?:<\|object_ref_start\|>(.*?)<\|object_ref_end\|>)?\s*(?:<\|box_start\|>)?"
                        rf"\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)")


def grounding_prompt(target: str) -> str:
    """The question that asks the model for ``target``'s box as JSON."""
    return PROMPT.format(target=target)


@dataclass(frozen=True)
class Grounding:
    """One box (``bbox``: x1, y1, x2, y2) or point (``point``: x, y) with its ``label``; coordinates on
    whichever grid the step that made it says (``parse_grounding``: the model's; ``ground``: original
    pixels). ``extra``: the item's other keys as the model wrote them."""

    label: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    extra: tuple[tuple[str, object], ...] = ()

    def to_dict(self, digits: int = 1) -> dict:
        """Qwen's own shape: ``{"bbox_2d": [...], "label": ...}`` or ``{"point_2d": [...], ...}``."""
        out: dict = {}
        if self.bbox is not None:
            out["bbox_2d"] = [round(v, digits) for v in self.bbox]
        if self.point is not None:
            out["point_2d"] = [round(v, digits) for v in self.point]
        if self.label is not None:
            out["label"] = self.label
        out.update(self.extra)
        return out


def parse_grounding(text: str) -> list[Grounding]:
    """The boxes and points of an answer, on the model's grid. Takes Qwen's JSON (``bbox_2d`` /
    ``point_2d`` with ``label``) in or out of a code fence, a list or one object (or objects one after
    another), ignores text around it, and keeps the complete items of a list cut short (max_tokens);
    else Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` format. Items without a valid box or
    point are dropped."""
    fenced = [m.group(1) for m in _FENCE.finditer(text)] if "```" in text else []
    for candidate in [*fenced, text]:
        items = _json_items(candidate)
        if items:
            return items
    return _qwen2_boxes(text)


def _json_items(text: str) -> list[Grounding]:
    """The grounding items of the first JSON list or object run in ``text`` that has any."""
    decoder = json.JSONDecoder()
    start = _next_open(text, 0)
    while start is not None:
        values, end = _values(decoder, text, start)
        items = [g for v in values for g in _items_of(v)]
        if items:
            return items
        start = _next_open(text, start + 1)
    return []


def _next_open(text: str, at: int) -> int | None:
    positions = [p for p in (text.find("[", at), text.find("{", at)) if p >= 0]
    return min(positions) if positions else None


def _values(decoder: json.JSONDecoder, text: str, start: int) -> tuple[list, int]:
    """The complete JSON values from ``start``: the elements of a list that opens there (as many as
    decode: a list cut short keeps its whole items), or objects one after another."""
    inside = text[start] == "["
    at, out = start + inside, []
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]" or (not inside and text[at] != "{"):
            return out, at
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:  # cut short, or no JSON from here on
            return out, at
        out.append(value)


def _items_of(value) -> list[Grounding]:
    if isinstance(value, list):  # [[{...}, {...}]]: one level of nesting
        return [g for v in value if isinstance(v, dict) for g in _items_of(v)]
    if not isinstance(value, dict):
        return []
    bbox, point = _numbers(value.get("bbox_2d"), 4), _numbers(value.get("point_2d"), 2)
    if bbox is None and point is None:
        return []
    if bbox is not None:
        x1, y1, x2, y2 = bbox
        bbox = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    label = value.get("label")
    extra = tuple((k, v) for k, v in value.items() if k not in ("bbox_2d", "point_2d", "label"))
    return [Grounding(None if label is None else str(label), bbox, point, extra)]


def _numbers(value, n: int) -> tuple[float, ...] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return tuple(float(v) for v in value)


def _qwen2_boxes(text: str) -> list[Grounding]:
    out = []
    for m in _QWEN2_BOX.finditer(text):
        x1, y1, x2, y2 = (float(v) for v in m.group(2, 3, 4, 5))
        out.append(Grounding(m.group(1), (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))))
    return out


def to_original(items: list[Grounding], size: MediaSize, coordinates: str) -> list[Grounding]:
    """``items`` moved from the model's grid (``coordinates``: "absolute" or "relative_1000") to
    ``size``'s original pixels, clamped to the image."""
    if coordinates == ABSOLUTE:
        sx, sy = size.width / size.resized_width, size.height / size.resized_height
    elif coordinates == RELATIVE_1000:
        sx, sy = size.width / 1000, size.height / 1000
    else:
        raise ValueError(f"coordinates {coordinates!r}: expected {ABSOLUTE!r} or {RELATIVE_1000!r}")

    def xy(x: float, y: float) -> tuple[float, float]:
        return min(max(x * sx, 0.0), float(size.width)), min(max(y * sy, 0.0), float(size.height))

    out = []
    for g in items:
        bbox = None if g.bbox is None else (*xy(*g.bbox[:2]), *xy(*g.bbox[2:]))
        out.append(Grounding(g.label, bbox, None if g.point is None else xy(*g.point), g.extra))
    return out


def ground(answer: str, media: Media, image: int = 0, *, family: str | None = None) -> list[Grounding]:
    """The boxes and points of ``answer`` in the original pixels of the request's ``image``-th image.
    ``media``: ``result.media`` of that request. ``family`` overrides the grid the server named
    (e.g. a fine-tuned model answering on another family's grid)."""
    if media is None:
        raise ValueError("no media sizes: the server sent no media_sizes output (a tritonvl server before issue "
                         "29?), so the size the model saw is unknown")
    coordinates = coordinates_of(family) if family else media.coordinates
    if coordinates is None:
        raise ValueError("the server did not say which grid the model's coordinates are on: give family=")
    if not 0 <= image < len(media.images):
        raise ValueError(f"image {image}: the request had {len(media.images)} image(s)")
    return to_original(parse_grounding(answer), media.images[image], coordinates)


def draw(image, items: list[Grounding], out: str | Path | None = None):
    """A copy of ``image`` (a path, bytes, data: URI or PIL image; EXIF orientation applied, as the
    server does) with each box, point and label drawn in its own colour; saved to ``out`` if given.
    ``items`` in original pixels (``ground``). Returns the PIL image."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    if isinstance(image, str) and image.startswith("data:"):
        image = base64.b64decode(image.split(",", 1)[1])
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, Path)):
        image = Image.open(image)
    img = (ImageOps.exif_transpose(image) or image).convert("RGB")
    pen = ImageDraw.Draw(img)
    line = max(2, round(min(img.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, min(img.size) // 40))
    except TypeError:  # Pillow < 10.1: one size
        font = ImageFont.load_default()
    for k, g in enumerate(items):
        color = COLORS[k % len(COLORS)]
        if g.bbox is not None:
            pen.rectangle(g.bbox, outline=color, width=line)
            anchor = g.bbox[:2]
        if g.point is not None:
            x, y, r = *g.point, line * 2
            pen.ellipse((x - r, y - r, x + r, y + r), fill=color, outline=(255, 255, 255))
            anchor = (x + r, y - r)
        if g.label:  # above the box's corner (below it when the box touches the top), on the box's colour
            height = pen.textbbox((0, 0), g.label, font=font)[3] + 4
            x, y = anchor[0], anchor[1] - height if anchor[1] >= height else anchor[1] + line
            left, top, right, bottom = pen.textbbox((x + 2, y + 2), g.label, font=font)
            pen.rectangle((x, y, right + 2, bottom + 2), fill=color)
            pen.text((x + 2, y + 2), g.label, fill=(255, 255, 255), font=font)
    if out is not None:
        img.save(out)
    return img
