"""Odd but valid images: every mode and container is served, and its pixels are the right ones.

The pixels are read from the `preprocess` step itself (a plain model of the repository) and
compared with the model's image processor applied to the RGB image each file should show.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from helpers import make_image
from PIL import Image

GEN = "/v2/models/qwen2_5_vl/generate"
BASE = make_image(112, 84, seed=31)  # RGB content shared by the cases


def rgb(data: bytes = BASE) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def on_white(color: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """What a viewer shows: colour over a white page, by alpha (uint8 arrays)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    out = color.astype(np.float64) * a + 255.0 * (1 - a)
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")


def rgba_case():
    color = np.asarray(rgb())
    alpha = np.tile(np.linspace(0, 255, color.shape[1]).astype(np.uint8), (color.shape[0], 1))
    return save(Image.fromarray(np.dstack([color, alpha]), "RGBA")), on_white(color, alpha)


def la_case():
    grey = np.asarray(rgb().convert("L"))
    alpha = np.tile(np.linspace(255, 0, grey.shape[0]).astype(np.uint8)[:, None], (1, grey.shape[1]))
    return save(Image.fromarray(np.dstack([grey, alpha]), "LA")), on_white(np.dstack([grey] * 3), alpha)


def palette_case():
    """P mode with one fully transparent palette entry (a GIF/PNG-8 cut-out)."""
    p = rgb().quantize(16)
    palette = np.asarray(p.getpalette()[: 16 * 3], np.uint8).reshape(16, 3)
    idx = np.asarray(p)
    p.info["transparency"] = 0
    color = palette[idx]
    alpha = np.where(idx == 0, 0, 255).astype(np.uint8)
    return save(p, transparency=0), on_white(color, alpha)


def i16_case():
    """16-bit grey PNG (I;16): scaled to 8 bits, not clipped at 255."""
    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (56, 1))
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    expect = np.clip(ramp.astype(np.float32) / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    return save(img), Image.fromarray(expect, "L").convert("RGB")


def bilevel_case():
    checker = (np.indices((64, 80)).sum(0) // 8 % 2 * 255).astype(np.uint8)
    return save(Image.fromarray(checker, "L").convert("1")), Image.fromarray(checker, "L").convert("RGB")


def cmyk_case():
    """CMYK JPEG of flat colour blocks (flat, so the lossy round trip stays close)."""
    blocks = np.zeros((64, 96, 3), np.uint8)
    blocks[:, :32] = (200, 40, 40)
    blocks[:, 32:64] = (40, 160, 60)
    blocks[:, 64:] = (30, 60, 200)
    img = Image.fromarray(blocks, "RGB")
    return save(img.convert("CMYK"), "JPEG", quality=98), img


def grey_jpeg_case():
    grey = rgb().convert("L")
    data = save(grey, "JPEG", quality=95)
    return data, Image.open(io.BytesIO(data)).convert("RGB")


def trns_rgb_case():
    """RGB PNG with a tRNS colour key: that colour is transparent."""
    color = np.asarray(rgb()).copy()
    color[:20, :20] = (1, 2, 3)
    alpha = np.where((color == (1, 2, 3)).all(-1), 0, 255).astype(np.uint8)
    return save(Image.fromarray(color, "RGB"), transparency=(1, 2, 3)), on_white(color, alpha)


def lossless(fmt: str, **kw):
    return lambda: (save(rgb(), fmt, **kw), rgb())


CASES = {
    "rgba-png": rgba_case,
    "la-png": la_case,
    "palette-transparent-png": palette_case,
    "i16-grey-png": i16_case,
    "1-bit-png": bilevel_case,
    "cmyk-jpeg": cmyk_case,
    "grey-jpeg": grey_jpeg_case,
    "rgb-png-trns-colour-key": trns_rgb_case,
    "webp-lossless": lossless("WEBP", lossless=True),
    "bmp": lossless("BMP"),
    "progressive-jpeg": lambda: (
        save(rgb(), "JPEG", progressive=True, quality=95),
        Image.open(io.BytesIO(save(rgb(), "JPEG", progressive=True, quality=95))).convert("RGB"),
    ),
    "tiny-1x1": lambda: (
        save(Image.new("RGB", (1, 1), (9, 99, 199))),
        Image.new("RGB", (1, 1), (9, 99, 199)),
    ),
    "tiny-2x300": lambda: (save(rgb().resize((2, 300))), rgb().resize((2, 300))),
    "aspect-199": lambda: (save(rgb().resize((398, 2))), rgb().resize((398, 2))),
}
TOLERANCE = {"cmyk-jpeg": 12}  # 8-bit levels: JPEG of CMYK is lossy; others are exact or one rounding off


def preprocess(server, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values and image_grid_thw straight from the `preprocess` step."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
    image = httpclient.InferInput("image", [1, len(images)], "BYTES")
    image.set_data_from_numpy(np.array([images], dtype=np.object_))
    res = client.infer("preprocess", [text, image])
    return res.as_numpy("pixel_values")[0], res.as_numpy("image_grid_thw")[0]


def generate(server, images: list[bytes], **extra) -> dict:
    body = {
        "text_input": "What is shown?",
        "image": [base64.b64encode(i).decode() for i in images],
        "max_tokens": 5,
        "temperature": 0,
        "exclude_input_in_output": True,
        **extra,
    }
    r = requests.post(f"http://{server.http_url}{GEN}", json=body, timeout=120)
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    out["output_ids"] = out["output_ids"] if isinstance(out["output_ids"], list) else [out["output_ids"]]
    return out


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(model_dir)


@pytest.mark.parametrize("name", list(CASES))
def test_odd_image_is_served_with_the_right_pixels(server, processor, name):
    data, shown = CASES[name]()
    pixels, grid = preprocess(server, [data])
    ref = processor(images=[shown], return_tensors="np")
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    # one 8-bit level is 1/255/std (~0.015) after normalization
    levels = np.abs(pixels - ref["pixel_values"]).max() * 0.27 * 255
    assert levels <= TOLERANCE.get(name, 1.5), f"{name}: off by {levels:.1f} levels"
    out = generate(server, [data])
    assert out["num_output_tokens"] == 5 and len(out["output_ids"]) == 5


def _frames(*colors) -> list[Image.Image]:
    return [Image.new("RGB", (84, 56), c) for c in colors] + [rgb().resize((84, 56))]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_uses_its_first_frame(server, fmt):
    frames = (
        _frames((250, 20, 20), (20, 250, 20))
        if fmt != "GIF"
        else [f.quantize(64) for f in _frames((250, 20, 20), (20, 250, 20))]
    )
    kw = {"lossless": True} if fmt == "WEBP" else {}
    animated = save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    first = Image.open(io.BytesIO(animated))
    assert getattr(first, "n_frames", 1) == 3, "the test image must be animated"
    first_png = save(first.convert("RGB"))
    second_png = save(frames[1].convert("RGB"))
    pixels, _ = preprocess(server, [animated])
    assert np.array_equal(pixels, preprocess(server, [first_png])[0])
    assert not np.array_equal(pixels, preprocess(server, [second_png])[0])
    assert generate(server, [animated])["output_ids"] == generate(server, [first_png])["output_ids"]


ROTATIONS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("orientation", sorted(ROTATIONS))
def test_exif_orientation_is_applied(server, orientation):
    stored = rgb().resize((112, 56))
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = save(stored, "JPEG", quality=95, exif=exif.tobytes())
    # the pre-rotated image: the JPEG's own decoded pixels, turned as the tag says
    upright = save(Image.open(io.BytesIO(jpeg)).convert("RGB").transpose(ROTATIONS[orientation]))
    pixels, grid = preprocess(server, [jpeg])
    want_pixels, want_grid = preprocess(server, [upright])
    assert grid.tolist() == want_grid.tolist()
    assert np.array_equal(pixels, want_pixels)
    if orientation != 3:  # a quarter turn swaps the patch grid
        assert grid[0, 1:].tolist() == preprocess(server, [save(stored)])[1][0, 1:][::-1].tolist()
    assert generate(server, [jpeg])["output_ids"] == generate(server, [upright])["output_ids"]
