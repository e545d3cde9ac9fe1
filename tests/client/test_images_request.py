"""Image sources and request encoding (no server)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from tritonvl.client.errors import ImageError, InvalidRequest
from tritonvl.client.images import ImageOptions, find_images, load_image
from tritonvl.client.params import SamplingParams
from tritonvl.client.request import build_request, normalize_messages


def png(w=8, h=6, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_path_bytes_and_data_uri(tmp_path):
    data = png()
    (tmp_path / "a.png").write_bytes(data)
    assert load_image(tmp_path / "a.png") == data
    assert load_image(str(tmp_path / "a.png")) == data
    assert load_image(bytearray(data)) == data
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image(uri) == uri  # passed through: the server decodes data URIs


def test_pil_and_arrays_become_png():
    img = Image.new("RGB", (5, 4), (1, 2, 3))
    assert decode(load_image(img)).getpixel((0, 0)) == (1, 2, 3)
    arr = np.zeros((4, 5, 3), np.uint8)
    arr[..., 1] = 200
    out = decode(load_image(arr))
    assert out.size == (5, 4) and out.getpixel((0, 0)) == (0, 200, 0)
    assert decode(load_image(np.full((3, 3), 0.5, np.float32))).getpixel((0, 0)) == 128
    assert decode(load_image(np.zeros((3, 3, 4), np.uint8))).mode == "RGBA"


@pytest.mark.parametrize("src,message", [
    ("/no/such/file.png", "no such file"),
    (np.zeros((2, 2, 5), np.uint8), "shape (2, 2, 5)"),
    (np.full((2, 2), 300, np.int32), "values outside 0..255"),
    (b"", "empty"),
    (3.5, "unsupported type float"),
])
def test_bad_sources(src, message):
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_image(src)


def test_size_cap(tmp_path):
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    with pytest.raises(ImageError, match="over the 100-byte cap"):
        load_image(tmp_path / "big.png", ImageOptions(max_bytes=100))


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        if self.path == "/slow":
            threading.Event().wait(2)
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/nolength":
            self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def web():
    _Handler.body = png(16, 16)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_fetch(web):
    assert load_image(f"{web}/img.png") == _Handler.body


@pytest.mark.parametrize("path,options,message", [
    ("/missing", ImageOptions(), "HTTP 404"),
    ("/img.png", ImageOptions(max_bytes=50), "over the 50-byte cap"),  # from Content-Length
    ("/nolength", ImageOptions(max_bytes=50), "over the 50-byte cap"),  # counted while reading
    ("/slow", ImageOptions(fetch_timeout=0.3), "could not fetch"),
])
def test_url_limits(web, path, options, message):
    with pytest.raises(ImageError, match=message):
        load_image(web + path, options)


def test_find_images(tmp_path):
    for name in ("a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.gif", "e.bmp", "f.jpeg", "notes.txt", "g.tiff"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert names == ["a.JPG", "b.png", "e.bmp", "f.jpeg", "sub/c.webp", "sub/deeper/d.gif"]


def test_messages_images_in_prompt_order():
    a, b, c = png(color=(1, 1, 1)), png(color=(2, 2, 2)), png(color=(3, 3, 3))
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "and"},
                                     {"type": "image"}, {"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
    ]
    out, images, videos = normalize_messages(msgs, [b, c], ImageOptions())
    assert videos == []
    assert images == [a, b, "data:x", c]
    assert out[1]["content"] == [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                 {"type": "image"}]
    assert out[0] == msgs[0] and out[2] == msgs[2]


@pytest.mark.parametrize("msgs,images,message", [
    ([], [], "non-empty list"),
    ([{"role": "user"}], [], "'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "image"}]}], [], "image part without an image"),
    ([{"role": "user", "content": "hi"}], [b"x"], "1 image(s) given"),
])
def test_bad_messages(msgs, images, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        normalize_messages(msgs, images, ImageOptions())


def test_encodings():
    import tritonclient.grpc as grpcclient

    data = png()
    req = build_request("what?", [data], None, SamplingParams.from_kwargs(max_tokens=3, stop=["x"]), True,
                        ImageOptions())
    body = json.loads(req.http_body())
    assert body["text_input"] == "what?" and body["max_tokens"] == 3 and body["stop_words"] == ["x"]
    assert body["stream"] is True and body["exclude_input_in_output"] is True
    assert base64.b64decode(body["image"][0]) == data  # base64 over HTTP
    inputs = {i.name(): i for i in req.grpc_inputs(grpcclient)}
    assert inputs["image"].shape() == [1, 1] and inputs["image"].datatype() == "BYTES"
    assert inputs["max_tokens"].shape() == [1, 1] and inputs["max_tokens"].datatype() == "INT32"
    assert inputs["stop_words"].shape() == [1, 1]
    assert inputs["exclude_input_in_output"].datatype() == "BOOL"
    assert "messages" not in inputs
    chat = build_request(None, None, [{"role": "user", "content": "hi"}], SamplingParams(), False, ImageOptions())
    body = json.loads(chat.http_body())
    assert json.loads(body["messages"]) == [{"role": "user", "content": "hi"}] and "text_input" not in body
