"""Image intake without a server: element forms, header checks, modes, limits and the URL policy."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.params import read as read_params
from tritonvl.handlers.preprocess import urlfetch
from tritonvl.handlers.preprocess.images import (
    ImageLimits,
    decode_image,
    image_bytes,
    limits_from_params,
    load_images,
)

LIMITS = ImageLimits()


def png(img: Image.Image | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    (img or Image.new("RGB", (32, 24), (10, 20, 30))).save(buf, format="PNG", **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


PNG = png()
B64 = base64.b64encode(PNG)


@pytest.mark.parametrize(
    "item",
    [
        PNG,
        B64,
        B64.decode(),
        base64.encodebytes(PNG),  # MIME-style line breaks
        b"  " + B64 + b"\n",
        b"data:image/png;base64," + B64,
        "DATA:image/png;charset=x;base64," + B64.decode(),
        b"data:;base64," + B64,
    ],
)
def test_element_forms_give_the_same_bytes(item):
    assert image_bytes(item, 0, LIMITS) == PNG


@pytest.mark.parametrize(
    "item,rule",
    [
        (b"", "empty image"),
        (b"data:image/png;base64,", "empty image"),
        (b"@@not base64@@", "not valid base64"),
        (B64[:-3], "not valid base64"),
        (b"data:text/plain;base64," + B64, "not an image"),
        (b"data:image/png,raw", "data URI must be"),
        (b"http://169.254.169.254/latest/meta-data/", "http URLs are not accepted"),
        (b"file:///etc/passwd", "file URLs are not accepted"),
        (" ftp://example.com/x.png", "ftp URLs are not accepted"),
        (b"HTTPS://example.com/x.png", "HTTPS URLs are not accepted"),
    ],
)
def test_bad_elements_are_refused_naming_the_rule(item, rule):
    with pytest.raises(InvalidArgument, match=rule):
        image_bytes(item, 3, LIMITS)


def test_byte_limit_applies_to_raw_and_base64():
    small = ImageLimits(max_bytes=100)
    for item in (PNG + b"\x00" * 200, base64.b64encode(PNG + b"\x00" * 200)):
        with pytest.raises(InvalidArgument, match="100-byte limit"):
            image_bytes(item, 0, small)


@pytest.mark.parametrize(
    "data,rule",
    [
        pytest.param(png_claiming(50000, 50000), "pixel limit", id="bomb-header"),
        pytest.param(png_claiming(7000, 7000), "pixel limit", id="over-limit-header"),
        pytest.param(PNG[:60], "truncated", id="truncated"),
        pytest.param(
            b"\x89PNG\r\n\x1a\n" + b"\x07" * 100, "not a recognizable image", id="magic-then-garbage"
        ),
        pytest.param(png(Image.new("RGB", (1, 201))), "aspect ratio", id="aspect"),
    ],
)
def test_decode_refuses_before_decoding(data, rule):
    with pytest.raises(InvalidArgument, match=rule):
        decode_image(data, 0, LIMITS)


def test_formats_outside_the_allow_list_are_not_parsed():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(InvalidArgument, match="allowed formats JPEG, PNG"):
        decode_image(buf.getvalue(), 0, LIMITS)
    with pytest.raises(InvalidArgument, match="allowed formats PNG"):
        decode_image(make_jpeg(), 0, ImageLimits(formats=("PNG",)))


def make_jpeg(img: Image.Image | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    (img or Image.new("RGB", (16, 16), (200, 10, 10))).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_modes_become_rgb_with_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(png(rgba), 0, LIMITS).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (4, 4), (0, 128))
    assert decode_image(png(half), 0, LIMITS).getpixel((0, 0)) == (127, 127, 127)
    key = Image.new("RGB", (4, 4), (1, 2, 3))
    assert decode_image(png(key, transparency=(1, 2, 3)), 0, LIMITS).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert deep.mode == "I;16" and decode_image(png(deep), 0, LIMITS).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(make_jpeg(Image.new("CMYK", (8, 8), (0, 0, 0, 0))), 0, LIMITS).mode == "RGB"


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show
    img = decode_image(make_jpeg(Image.new("RGB", (40, 20)), exif=exif.tobytes()), 0, LIMITS)
    assert img.size == (20, 40)


def test_too_many_images_is_refused_before_decoding():
    with pytest.raises(InvalidArgument, match="limit of 2"):
        load_images([b"junk"] * 3, ImageLimits(max_images=2))


def test_limits_from_params():
    params = {
        "max_image_bytes": "10",
        "max_images_per_request": "3",
        "image_formats": "png, jpeg",
        "max_prompt_bytes": "99",
        "image_url_allowlist": "Images.Example.com, *.cdn.example",
        "image_url_timeout_s": "2.5",
    }
    limits = limits_from_params(read_params("preprocess", params))
    assert (limits.max_bytes, limits.max_images, limits.formats, limits.max_prompt_bytes) == (
        10,
        3,
        ("PNG", "JPEG"),
        99,
    )
    assert limits.url_allowlist == ("images.example.com", "*.cdn.example") and limits.url_timeout_s == 2.5
    assert limits_from_params(read_params("preprocess", {})) == ImageLimits()


# --- URL fetching (off unless allow-listed), with resolution and HTTP replaced: no network ---

ALLOW = ImageLimits(url_allowlist=("images.example.com", "*.cdn.example"), url_timeout_s=1.0, max_bytes=4096)


@pytest.fixture
def net(monkeypatch):
    """Fake DNS (``names``) and HTTP (``pages``: url -> (status, headers, body)); records requests."""
    state = {
        "names": {"images.example.com": ["93.184.216.34"], "a.cdn.example": ["2606:4700::1"]},
        "pages": {},
        "requests": [],
    }

    def resolve(host, port):
        if host not in state["names"]:
            raise OSError("Name or service not known")
        return state["names"][host]

    def open_url(target, deadline, max_bytes, where, accept="image/*"):
        state["requests"].append((target.url, target.address))
        status, headers, body = state["pages"][target.url]
        if len(body) > max_bytes:
            raise InvalidArgument(f"{where}: the URL's body is over the {max_bytes}-byte limit")
        return status, headers, body

    monkeypatch.setattr(urlfetch, "resolve", resolve)
    monkeypatch.setattr(urlfetch, "open_url", open_url)
    return state


def test_allow_listed_url_is_fetched_at_the_checked_address(net):
    net["pages"]["https://images.example.com/cat.png"] = (200, {}, PNG)
    assert image_bytes(b"https://images.example.com/cat.png", 0, ALLOW) == PNG
    assert net["requests"] == [("https://images.example.com/cat.png", "93.184.216.34")]


@pytest.mark.parametrize(
    "url,rule",
    [
        ("http://evil.example.org/x.png", "not on the URL allow-list"),
        ("http://cdn.example/x.png", "not on the URL allow-list"),  # *.cdn.example: subdomains only
        ("ftp://images.example.com/x.png", "http and https only"),
        ("file://images.example.com/etc/passwd", "http and https only"),
        ("http://user:pw@images.example.com/x.png", "credentials"),
        ("http://images.example.com:99999/x.png", "not a valid URL"),
    ],
)
def test_url_rules(net, url, rule):
    with pytest.raises(InvalidArgument, match=rule):
        image_bytes(url, 0, ALLOW)
    assert net["requests"] == []


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "169.254.169.254",
        "10.0.0.7",
        "192.168.1.1",
        "100.100.100.200",
        "::1",
        "::ffff:127.0.0.1",
        "fd00:ec2::254",
        "fe80::1",
        "0.0.0.0",
    ],
)
def test_allow_listed_host_resolving_to_a_non_public_address_is_refused(net, address):
    net["names"]["images.example.com"] = ["93.184.216.34", address]  # one bad address is enough
    with pytest.raises(InvalidArgument, match="non-public address"):
        image_bytes("http://images.example.com/x.png", 0, ALLOW)
    assert net["requests"] == []


def test_every_redirect_is_checked(net):
    net["pages"]["http://images.example.com/a"] = (302, {"location": "http://a.cdn.example/b"}, b"")
    net["pages"]["http://a.cdn.example/b"] = (301, {"location": "/c"}, b"")
    net["pages"]["http://a.cdn.example/c"] = (200, {}, PNG)
    assert image_bytes("http://images.example.com/a", 0, ALLOW) == PNG
    net["pages"]["http://a.cdn.example/c"] = (
        302,
        {"location": "http://169.254.169.254/latest/meta-data/"},
        b"",
    )
    with pytest.raises(InvalidArgument, match="not on the URL allow-list"):
        image_bytes("http://images.example.com/a", 0, ALLOW)
    net["names"]["metadata.cdn.example"] = ["169.254.169.254"]
    net["pages"]["http://a.cdn.example/c"] = (307, {"location": "http://metadata.cdn.example/"}, b"")
    with pytest.raises(InvalidArgument, match="non-public address"):
        image_bytes("http://images.example.com/a", 0, ALLOW)


def test_redirect_loops_errors_and_sizes(net):
    net["pages"]["http://images.example.com/loop"] = (302, {"location": "/loop"}, b"")
    with pytest.raises(InvalidArgument, match="redirects"):
        image_bytes("http://images.example.com/loop", 0, ALLOW)
    net["pages"]["http://images.example.com/404"] = (404, {}, b"")
    with pytest.raises(InvalidArgument, match="HTTP 404"):
        image_bytes("http://images.example.com/404", 0, ALLOW)
    net["pages"]["http://images.example.com/big"] = (200, {}, b"\x89PNG" + b"\0" * 5000)
    with pytest.raises(InvalidArgument, match="4096-byte limit"):
        image_bytes("http://images.example.com/big", 0, ALLOW)
    with pytest.raises(InvalidArgument, match="does not resolve"):
        image_bytes("http://nowhere.cdn.example/x.png", 0, ALLOW)


def test_fetch_has_one_deadline(monkeypatch):
    """The real HTTP path against a socket that never answers: refused at the deadline."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    monkeypatch.setattr(urlfetch, "resolve", lambda host, p: ["127.0.0.1"])
    monkeypatch.setattr(urlfetch, "public_address", lambda a: True)  # let the test reach loopback
    limits = ImageLimits(url_allowlist=("slow.example",), url_timeout_s=0.5)
    start = time.monotonic()
    try:
        with pytest.raises(InvalidArgument, match="longer than 0.5 s"):
            image_bytes(f"http://slow.example:{port}/x.png", 0, limits)
    finally:
        listener.close()
    assert time.monotonic() - start < 3
