"""Video sources and their request encoding in the client (no server)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tritonvl.client.errors import InvalidRequest, VideoError
from tritonvl.client.images import ImageOptions
from tritonvl.client.params import SamplingParams
from tritonvl.client.request import build_request, normalize_messages
from tritonvl.client.videos import VideoOptions, find_videos, load_video

CLIP = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4  # container bytes: the client never decodes them


def png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, "PNG")
    return buf.getvalue()


def test_path_bytes_and_data_uri(tmp_path):
    (tmp_path / "c.mp4").write_bytes(CLIP)
    assert load_video(tmp_path / "c.mp4") == CLIP
    assert load_video(str(tmp_path / "c.mp4")) == CLIP
    assert load_video(memoryview(CLIP)) == CLIP
    uri = "data:video/mp4;base64," + base64.b64encode(CLIP).decode()
    assert load_video(uri) == uri  # passed through: the server decodes data URIs


def test_frame_list_is_json_of_base64(tmp_path):
    a, b = png((1, 2, 3)), png((4, 5, 6))
    (tmp_path / "a.png").write_bytes(a)
    pil = Image.new("RGB", (8, 6), (7, 8, 9))
    out = json.loads(load_video([tmp_path / "a.png", b, "data:image/png;base64,QUJD", pil, np.asarray(pil)]))
    assert [base64.b64decode(x) for x in out[:2]] == [a, b]
    assert out[2] == "data:image/png;base64,QUJD"
    assert Image.open(io.BytesIO(base64.b64decode(out[3]))).getpixel((0, 0)) == (7, 8, 9)
    assert out[4] == out[3]


@pytest.mark.parametrize("src,options,message", [
    ("nope.mp4", VideoOptions(), "nope.mp4: no such file"),
    (".", VideoOptions(), "is a directory"),
    (b"", VideoOptions(), "empty"),
    (CLIP, VideoOptions(max_bytes=100), "over the 100-byte cap"),
    ("rtsp://example.com/a.mp4", VideoOptions(), "rtsp URLs are not accepted"),
    ("file:///etc/passwd", VideoOptions(), "file URLs are not accepted"),
    ([], VideoOptions(), "frame list is empty"),
    ([png()] * 3, VideoOptions(max_frames=2), "3 frames is over the 2-frame cap"),
    ([png()] * 3, VideoOptions(max_bytes=2 * len(png())), "frames are over the"),
    ([png(), "missing.png"], VideoOptions(), "video frame 1: image missing.png: no such file"),
    (["ftp://example.com/f.png"], VideoOptions(), "video frame 0: ftp URLs are not accepted"),
    (3.5, VideoOptions(), "unsupported type float"),
])
def test_bad_sources(src, options, message):
    with pytest.raises(VideoError, match=message.replace(".", r"\.")):
        load_video(src, options)
    assert issubclass(VideoError, InvalidRequest)


def test_http_urls_are_fetched_by_the_client():
    from helpers import media_host

    with media_host({"/c.mp4": (CLIP, "video/mp4"), "/f.png": (png(), "image/png")}) as (port, hits):
        base = f"http://127.0.0.1:{port}"
        assert load_video(f"{base}/c.mp4") == CLIP
        assert json.loads(load_video([f"{base}/f.png"])) == [base64.b64encode(png()).decode()]
        with pytest.raises(VideoError, match="video .*/gone.mp4: HTTP 404"):
            load_video(f"{base}/gone.mp4")
        with pytest.raises(VideoError, match="over the 100-byte cap"):
            load_video(f"{base}/c.mp4", VideoOptions(max_bytes=100))
    assert hits[:3] == ["/c.mp4", "/f.png", "/gone.mp4"]


def test_big_file_refused_before_reading(tmp_path):
    (tmp_path / "big.mp4").write_bytes(b"\x00" * 2048)
    with pytest.raises(VideoError, match="2048 bytes is over the 1024-byte cap"):
        load_video(tmp_path / "big.mp4", VideoOptions(max_bytes=1024))


def test_encodings(tmp_path):
    import tritonclient.grpc as grpcclient

    uri = "data:video/webm;base64,AAAA"
    req = build_request("what?", None, None, SamplingParams(), False, ImageOptions(), videos=[CLIP, uri, [png()]])
    body = json.loads(req.http_body())
    assert base64.b64decode(body["video"][0]) == CLIP  # base64 over HTTP
    assert body["video"][1] == uri and json.loads(body["video"][2])[0] == base64.b64encode(png()).decode()
    assert "image" not in body and body["text_input"] == "what?"
    inputs = {i.name(): i for i in req.grpc_inputs(grpcclient)}
    assert inputs["video"].shape() == [1, 3] and inputs["video"].datatype() == "BYTES"
    one = build_request("x", None, None, SamplingParams(), False, ImageOptions(), videos=CLIP)  # a bare video
    assert one.videos == [CLIP]
    none = build_request("x", None, None, SamplingParams(), False, ImageOptions())
    assert "video" not in json.loads(none.http_body())
    assert "video" not in {i.name() for i in none.grpc_inputs(grpcclient)}


def test_messages_video_parts_in_order(tmp_path):
    (tmp_path / "c.mp4").write_bytes(CLIP)
    uri = "data:video/mp4;base64,AAAA"
    msgs = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": str(tmp_path / "c.mp4")}, "fps": 1},
        {"type": "image", "image": png()},
        {"type": "video", "video": [png()], "num_frames": 2, "max_pixels": 3136},
        {"type": "video"},
        {"type": "video_url", "video_url": {"url": uri}},
        {"type": "text", "text": "?"}]}]
    out, images, videos = normalize_messages(msgs, [], ImageOptions(), [b"tensor video"])
    assert out[0]["content"] == [{"type": "video", "fps": 1}, {"type": "image"},
                                 {"type": "video", "num_frames": 2, "max_pixels": 3136}, {"type": "video"},
                                 {"type": "video"}, {"type": "text", "text": "?"}]
    assert images == [png()]
    assert videos[0] == CLIP and json.loads(videos[1]) == [base64.b64encode(png()).decode()]
    assert videos[2:] == [b"tensor video", uri]
    req = build_request(None, None, msgs, SamplingParams(), False, ImageOptions(), videos=[b"tensor video"])
    assert len(req.videos) == 4 and json.loads(json.loads(req.http_body())["messages"]) == out


@pytest.mark.parametrize("content,videos,message", [
    ([{"type": "video"}], [], "video part without a video"),
    ("hi", [CLIP], "1 video(s) given"),
    ([{"type": "video", "video": "gone.mp4"}], [], "gone.mp4: no such file"),
])
def test_bad_messages(content, videos, message):
    msgs = [{"role": "user", "content": content}]
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        normalize_messages(msgs, [], ImageOptions(), videos)


def test_find_videos(tmp_path):
    for name in ("a.mp4", "sub/b.WEBM", "c.gif", "d.png", "e.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_videos(tmp_path)] == ["a.mp4", "sub/b.WEBM"]
