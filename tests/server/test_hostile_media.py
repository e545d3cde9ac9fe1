"""Hostile media against a real tritonserver at the default preprocess limits (issue 24): bombs that
cost the client a few kB and the server (before the fix) seconds to minutes of decoding and GBs of
memory. Each is refused with INVALID_ARG naming the limit, quickly; the server's memory (RSS of
tritonserver and every stub, sampled while the request runs) grows by less than MEMORY_BOUND_MB;
the server stays ready and answers a normal request exactly as before. Also: a URL video whose
content changed between two requests is served as its new content (the video cache keys by content).

The figures of each case are printed (run with -s to see them) and written to
/tmp/tritonvl-hostile-media.json.
"""

from __future__ import annotations

import base64
import fractions
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from helpers import make_image, media_host, running_server
from PIL import Image
from videos import make_video

MEMORY_BOUND_MB = 512  # docs/SECURITY.md, "Media and URLs"
GEN = "/v2/models/qwen2_5_vl/generate"
FIGURES: dict = {}


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    # defaults everywhere but the URL test's local host (loopback: the test-only switch)
    settings = {"image_url_allowlist": "127.0.0.1", "image_url_allow_loopback": "true"}
    with running_server(model_dir, tmp_path_factory.mktemp("hostile"), overrides={"preprocess": settings}) as s:
        yield s
    with open("/tmp/tritonvl-hostile-media.json", "w") as f:
        json.dump(FIGURES, f, indent=1)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (tritonserver and its stubs)."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssPeak:
    """Samples the server tree's RSS every 20 ms while a block runs; keeps the highest."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def post(srv, body: dict, timeout: float = 300) -> tuple[int, dict, float]:
    start = time.monotonic()
    r = requests.post(f"http://{srv.http_url}{GEN}", json=body, timeout=timeout)
    return r.status_code, r.json(), time.monotonic() - start


def greedy(**fields) -> dict:
    return {"max_tokens": 6, "temperature": 0.0, "exclude_input_in_output": True, **fields}


CLIP = make_video(n=8, width=112, height=84, fps=4, seed=11)
PHOTO = make_image(96, 72, seed=12)
NORMAL = {"video": greedy(text_input="What happens?", video=[base64.b64encode(CLIP).decode()]),
          "image": greedy(text_input="What is it?", image=[base64.b64encode(PHOTO).decode()])}


@pytest.fixture(scope="module")
def normal(srv) -> dict:
    """Ordinary answers before any bomb: every later one must equal them."""
    out = {}
    for name, body in NORMAL.items():
        status, answer, _ = post(srv, body)
        assert status == 200, answer
        out[name] = answer
    return out


def assert_still_serving(srv, normal) -> None:
    assert requests.get(f"http://{srv.http_url}/v2/health/ready", timeout=5).status_code == 200
    for name, body in NORMAL.items():
        status, answer, _ = post(srv, body)
        assert status == 200 and answer == normal[name], (name, answer, normal[name])


def measured(srv, name: str, body: dict) -> tuple[int, dict, float]:
    """The request's answer and seconds; the server tree's RSS before, at its peak, after (MB)."""
    time.sleep(0.5)
    before = tree_rss(srv.proc.pid)
    with RssPeak(srv.proc.pid) as peak:
        status, answer, seconds = post(srv, body)
    time.sleep(0.5)
    after = tree_rss(srv.proc.pid)
    mb = 1 << 20
    FIGURES[name] = {"status": status, "seconds": round(seconds, 2), "request_kb": len(json.dumps(body)) // 1024,
                     "rss_before_mb": before // mb, "peak_growth_mb": (peak.peak - before) // mb,
                     "growth_after_mb": (after - before) // mb, "error": answer.get("error", "")[:300]}
    print(name, FIGURES[name])
    assert peak.peak - before < MEMORY_BOUND_MB * mb, FIGURES[name]
    return status, answer, seconds


def webp(width: int, height: int, colour=(40, 120, 200)) -> str:
    """A lossless WebP of one colour: about 1 kB whatever its size."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="WEBP", lossless=True)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


def png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 60)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_frame_list_bomb_refused_from_headers(srv, normal):
    """400 lossless WebP frames of 6000x4000 (about 0.5 MB of request): 9.6 G pixels to decode, over
    max_video_decoded_pixels; refused after reading headers only."""
    frames = [webp(6000, 4000)] * 400
    status, answer, seconds = measured(srv, "frame_list_bomb", greedy(text_input="x", video=[json.dumps(frames)]))
    assert status == 400, answer
    assert "video[0]: decoding 400 frames of 6000x4000 is 9600000000 pixels, over the max_video_decoded_pixels " \
           "limit of 8493465600 per request" in answer["error"], answer
    assert seconds < 20, seconds
    assert_still_serving(srv, normal)


def test_big_frames_are_decoded_one_at_a_time(srv, normal):
    """The issue's frame-list shape (6000x4000 lossless WebP frames), few enough to be within the
    budget: answered, and only one full-size frame is ever held."""
    frames = [webp(6000, 4000, (40 + 50 * i, 120, 200)) for i in range(4)]
    status, answer, _ = measured(srv, "four_24mp_frames", greedy(text_input="x", video=[json.dumps(frames)]))
    assert status == 200 and answer["num_output_tokens"] == 6, answer
    assert_still_serving(srv, normal)


def test_tiny_frame_list_bomb_refused_before_decoding(srv, normal):
    """768 frames of 2x2 pixels (about 120 kB): each would be enlarged to Qwen's min_pixels, 87 M
    pixels of float32 rows (1 GB, and copies of it) for a prompt the model cannot take; the tokens are
    counted from the headers and refused first."""
    frames = [png(2, 2)] * 768
    status, answer, seconds = measured(srv, "tiny_frame_list_bomb", greedy(text_input="x", video=[json.dumps(frames)]))
    assert status == 400, answer
    assert "video[0]: the request's videos make" in answer["error"] and "max_model_len" in answer["error"], answer
    assert seconds < 20, seconds
    assert_still_serving(srv, normal)


def h264_bomb(width: int, height: int, frames: int, fps: int = 30) -> bytes:
    """``frames`` frames of one colour at width x height in about 100 kB of MP4: two frames encoded
    with libx264, the second (a P frame of skipped blocks: a few bytes) muxed again for every frame."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "bframes": "0"}
        stream.gop_size = 100000
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
        packets = []
        for i in range(2):
            frame.pts = i
            packets += [bytes(p) for p in stream.encode(frame)]
        packets += [bytes(p) for p in stream.encode()]
        for i in range(frames):
            packet = av.Packet(packets[0] if i == 0 else packets[1])
            packet.pts = packet.dts = i
            packet.time_base = fractions.Fraction(1, fps)
            packet.stream = stream
            packet.is_keyframe = i == 0
            out.mux(packet)
    return buf.getvalue()


def test_container_video_bomb_refused_from_the_header(srv, normal):
    """An MP4 of 300 frames of 7680x4320 in about 110 kB (each frame under max_image_pixels, the
    whole 10 G pixels of decoding): refused from the header and packet count, nothing decoded."""
    video = h264_bomb(7680, 4320, 300)
    assert len(video) < 200_000
    status, answer, seconds = measured(srv, "container_bomb",
                                       greedy(text_input="x", video=[base64.b64encode(video).decode()]))
    assert status == 400, answer
    assert "video[0]: decoding 300 frames of 7680x4320 is 9953280000 pixels, over the max_video_decoded_pixels " \
           "limit of 8493465600 per request" in answer["error"], answer
    assert seconds < 20, seconds
    assert_still_serving(srv, normal)


def test_url_video_is_cached_by_its_content(srv, normal):
    """The same URL before and after its video changed (8 frames, then 16: more tokens): every answer
    is the one for the content the URL has at the time, as the same bytes sent inline get."""
    first, second = make_video(n=8, fps=4, seed=21), make_video(n=16, fps=4, seed=22)
    inline = {}
    for name, data in (("first", first), ("second", second)):
        status, answer, _ = post(srv, greedy(text_input="Which?", video=[base64.b64encode(data).decode()]))
        assert status == 200, answer
        inline[name] = answer
    assert inline["first"]["num_input_tokens"] != inline["second"]["num_input_tokens"]
    files = {"/clip.mp4": (first, "video/mp4")}
    with media_host(files) as (port, hits):
        body = greedy(text_input="Which?", video=[f"http://127.0.0.1:{port}/clip.mp4"])
        before = [post(srv, body)[1] for _ in range(4)]  # over both preprocess instances' caches
        files["/clip.mp4"] = (second, "video/mp4")
        after = [post(srv, body)[1] for _ in range(4)]
    assert len(hits) == 8
    assert all(a == inline["first"] for a in before), before
    assert all(a == inline["second"] for a in after), after
    assert_still_serving(srv, normal)
