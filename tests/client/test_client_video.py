"""Videos through the client library and the CLI against a real tritonserver (its own, with small video
budgets): greedy output equals the same video sent straight to the server (tritonclient / plain HTTP,
tests/helpers.py), whose own parity with generate() is tests/server/test_video.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys

import pytest
from helpers import infer_http, make_image
from videos import frame_list, make_video

from tritonvl.client import AsyncClient, Client, InvalidRequest, VideoError
from tritonvl.client.cli import main

MAX = 8
CLIP = make_video(n=8, width=112, height=84, fps=8, seed=51)
CLIP2 = make_video(n=6, width=84, height=112, fps=4, fmt="webm", seed=52)
PROTOCOLS = ["grpc", "http"]


@pytest.fixture(scope="module")
def vserver(video_server):
    """The session's video server (tests/conftest.py VIDEO_SETTINGS: 30 s, 300 frames, 2 MB at most)."""
    return video_server


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def direct(server, **fields) -> dict:
    """The same request straight to the server's generate endpoint (greedy)."""
    return infer_http(server.http_url, temperature=0.0, max_tokens=MAX, exclude_input_in_output=True, **fields)


def uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_video_source_equals_the_server(vserver, tmp_path, protocol):
    path = tmp_path / "clip.mp4"
    path.write_bytes(CLIP)
    want = direct(vserver, text_input="What happens?", video=[CLIP])
    with Client(url(vserver, protocol), protocol, timeout=120) as client:
        for src in (path, str(path), CLIP, uri(CLIP)):
            r = client.generate("What happens?", videos=[src], max_tokens=MAX)
            assert r.output_ids == want["output_ids"], src if isinstance(src, str) else type(src)
            assert r.text == want["text_output"] and r.usage.videos == 1 and r.usage.images == 0
        bare = client.generate("What happens?", videos=path, max_tokens=MAX)  # one video, not in a list
        assert bare.output_ids == want["output_ids"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_videos_and_an_image_stream(vserver, protocol):
    img = make_image(100, 80, seed=53)
    want = direct(vserver, text_input="Compare.", image=[img], video=[CLIP, CLIP2])
    with Client(url(vserver, protocol), protocol, timeout=120) as client:
        with client.stream("Compare.", images=[img], videos=[CLIP, CLIP2], max_tokens=MAX) as s:
            deltas = list(s)
    assert "".join(deltas) == want["text_output"] and s.result.output_ids == want["output_ids"]
    assert s.result.usage.videos == 2 and s.result.usage.images == 1


def test_frame_paths_equal_the_server_frame_list(vserver, tmp_path):
    frames = json.loads(frame_list(5, seed=54))
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"f{i}.png")
        paths[-1].write_bytes(base64.b64decode(f.split(",", 1)[1]))
    want = direct(vserver, text_input="Frames.", video=[json.dumps(frames)])
    with Client(vserver.grpc_url, timeout=120) as client:
        assert client.generate("Frames.", videos=[paths], max_tokens=MAX).output_ids == want["output_ids"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_chat_parts_with_local_sources(vserver, tmp_path, protocol):
    """video_url with a path and its own sampling keys, then a bare part taking videos=; the server sees
    the same request as data URIs in the messages."""
    path = tmp_path / "clip.webm"
    path.write_bytes(CLIP2)
    keys = {"num_frames": 4, "max_pixels": 12 * 28 * 28}
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(path)}, **keys},
                                         {"type": "video", "fps": 1}, {"type": "text", "text": "Both?"}]}]
    server_msgs = [msgs[0], {"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": uri(CLIP2, "video/webm")}, **keys},
        {"type": "video", "video": uri(CLIP), "fps": 1}, {"type": "text", "text": "Both?"}]}]
    want = direct(vserver, text_input="", messages=json.dumps(server_msgs))
    with Client(url(vserver, protocol), protocol, timeout=120) as client:
        r = client.chat(msgs, videos=[CLIP], max_tokens=MAX)
    assert r.output_ids == want["output_ids"] and r.usage.videos == 2


def test_async_concurrent(vserver):
    clips = [make_video(n=8 + 2 * i, fps=8, seed=60 + i) for i in range(3)]
    wants = [direct(vserver, text_input="Go.", video=[c])["output_ids"] for c in clips]

    async def run():
        async with AsyncClient(vserver.grpc_url, timeout=120) as client:
            return await asyncio.gather(*(client.generate("Go.", videos=[c], max_tokens=MAX) for c in clips))

    assert [r.output_ids for r in asyncio.run(run())] == wants


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_videos(vserver, tmp_path, protocol):
    with Client(url(vserver, protocol), protocol, timeout=120) as client:
        with pytest.raises(VideoError, match="no such file"):  # before anything is sent
            client.generate("x", videos=[tmp_path / "missing.mp4"])
        with pytest.raises(VideoError, match="rtsp URLs are not accepted"):
            client.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "rtsp://a/b.mp4"}}]}])
        with pytest.raises(InvalidRequest, match=r"video\[0\]: not a decodable video"):  # the server's message
            client.generate("x", videos=[b"\x00\x01not a video" * 40], max_tokens=2)
        with pytest.raises(InvalidRequest, match="longer than the 30 s limit"):
            client.generate("x", videos=[make_video(n=124, width=56, height=56, fps=4)], max_tokens=2)
        assert client.is_ready()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_describe_video_json(vserver, tmp_path, capsys):
    (tmp_path / "a.mp4").write_bytes(CLIP)
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01not a video" * 40)
    code, out, err = run_cli(capsys, "describe", "--video", str(tmp_path / "a.mp4"), "--video",
                             str(tmp_path / "bad.mp4"), "--url", vserver.grpc_url, "--max-tokens", str(MAX), "--json")
    assert code == 1  # one video failed
    ok, bad = [json.loads(line) for line in out.splitlines()]
    want = direct(vserver, text_input="Describe this video.", video=[CLIP])  # the default question for a video
    assert ok["video"].endswith("a.mp4") and ok["output_ids"] == want["output_ids"] and ok["usage"]["videos"] == 1
    assert bad["video"].endswith("bad.mp4") and "not a decodable video" in bad["error"]
    assert err.count("\n") == 1 and "bad.mp4" in err


def test_cli_video_sampling_options(vserver, tmp_path, capsys, monkeypatch):
    """--num-frames / --fps go on the video's message part: the server samples by them."""
    clip = make_video(n=16, width=112, height=84, fps=8, seed=52)  # 2 s: 4 frames at the default 2 fps
    (tmp_path / "a.mp4").write_bytes(clip)
    code, out, _ = run_cli(capsys, "describe", "--video", str(tmp_path / "a.mp4"), "--num-frames", "2",
                           "--url", vserver.grpc_url, "--max-tokens", str(MAX), "--json")
    few = json.loads(out)
    msgs = [{"role": "user", "content": [{"type": "video", "num_frames": 2},
                                         {"type": "text", "text": "Describe this video."}]}]
    want = direct(vserver, text_input="", messages=json.dumps(msgs), video=[clip])
    default = direct(vserver, text_input="Describe this video.", video=[clip])
    assert code == 0 and few["output_ids"] == want["output_ids"]
    assert few["usage"]["input_tokens"] == want["num_input_tokens"] < default["num_input_tokens"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Go on.\n/exit\n"))
    code, out, _ = run_cli(capsys, "chat", "--url", vserver.grpc_url, "--video", str(tmp_path / "a.mp4"),
                           "--fps", "1", "--max-tokens", str(MAX), "--temperature", "0")
    msgs = [{"role": "user", "content": [{"type": "video", "fps": 1}, {"type": "text", "text": "Go on."}]}]
    assert code == 0 and out == direct(vserver, text_input="", messages=json.dumps(msgs), video=[clip])[
        "text_output"] + "\n"
    with pytest.raises(SystemExit):  # one or the other
        main(["describe", "--video", "x.mp4", "--fps", "1", "--num-frames", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_chat_with_video(vserver, tmp_path, capsys, monkeypatch):
    (tmp_path / "a.mp4").write_bytes(CLIP)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What moves?\n/exit\n"))
    code, out, _ = run_cli(capsys, "chat", "--url", "http://" + vserver.http_url, "--video", str(tmp_path / "a.mp4"),
                           "--max-tokens", str(MAX), "--temperature", "0")
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    assert code == 0 and out == direct(vserver, text_input="", messages=json.dumps(msgs), video=[CLIP])[
        "text_output"] + "\n"


def test_cli_batch_images_and_videos(vserver, tmp_path, capsys):
    folder = tmp_path / "media"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.mp4").write_bytes(CLIP)
    (folder / "sub" / "b.webm").write_bytes(CLIP2)
    (folder / "c.png").write_bytes(make_image(60, 40, seed=55))
    out_file = tmp_path / "captions.jsonl"
    code, _, err = run_cli(capsys, "batch", str(folder), "--out", str(out_file), "--url", vserver.grpc_url,
                           "--max-tokens", str(MAX), "--quiet")
    assert code == 0 and "3 captioned, 0 failed" in err
    records = {r["path"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    assert sorted(records) == ["a.mp4", "c.png", "sub/b.webm"]
    assert records["a.mp4"]["usage"]["videos"] == 1 and records["c.png"]["usage"]["images"] == 1
    assert records["sub/b.webm"]["text"] == direct(vserver, text_input="Describe this video.", video=[CLIP2])[
        "text_output"]
