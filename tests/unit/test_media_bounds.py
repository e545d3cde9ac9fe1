"""Bounded work per request for media (issue 24): a frame list decodes only its sampled frames, one at
a time and resized at once, after every sampled frame's header and the request's decoded-pixel budget,
video tokens and frame count were checked; a container is charged from its header before decoding;
a decode deadline between frames; URL fetches with one deadline over everything, private-network
switches that never open loopback (but the test-only one) or link-local / metadata addresses, and a
video cache keyed by the fetched content, not the URL."""

from __future__ import annotations

import base64
import http.server
import io
import itertools
import json
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
from helpers import media_host
from PIL import Image
from videos import make_video

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers import params as P
from tritonvl.handlers.preprocess import urlfetch
from tritonvl.handlers.preprocess import video as V
from tritonvl.handlers.preprocess.clipcache import ClipCache
from tritonvl.handlers.preprocess.images import ImageLimits
from tritonvl.handlers.preprocess.video import Source, load_video, load_videos
from tritonvl.handlers.preprocess.video_rules import DecodeBudget, Geometry, VideoLimits, patchify

GEO = Geometry(14, 2, 2, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SMALL = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, total_pixels=64 * 28 * 28)


def frame_uri(width: int, height: int, colour=(40, 120, 200), fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def decodes(monkeypatch):
    """The frames a frame list decodes (where of each decode_image call), in order."""
    seen: list[str] = []
    real = V.decode_image

    def spy(data, index, limits, where=None):
        seen.append(where or f"image[{index}]")
        return real(data, index, limits, where) if where else real(data, index, limits)

    monkeypatch.setattr(V, "decode_image", spy)
    return seen


# --- frame lists ------------------------------------------------------------------------------


def test_frame_list_decodes_only_its_sampled_frames(decodes):
    frames = [frame_uri(56, 56, (i * 6, 0, 0)) for i in range(40)]
    clip = load_video(Source(json.dumps(frames), {"num_frames": 4}, "video[0]"), SMALL, ImageLimits(), GEO)
    assert int(clip.grid[0]) == 2
    assert decodes == ["video[0][0]", "video[0][13]", "video[0][26]", "video[0][39]"]  # linspace(0, 39, 4)


def test_frame_list_frame_over_the_pixel_limit_is_refused_before_any_decoding(decodes):
    frames = [frame_uri(56, 56)] * 3 + [frame_uri(300, 200)]
    with pytest.raises(InvalidArgument, match=r"video\[0\]\[3\]: 300x200 = 60000 pixels is over the 50000-pixel limit"):
        load_video(Source(json.dumps(frames), {}, "video[0]"), SMALL, ImageLimits(max_pixels=50_000), GEO)
    assert decodes == []


def test_frame_list_decoded_pixel_budget_is_checked_from_headers(decodes):
    frames = json.dumps([frame_uri(200, 100)] * 8)  # 8 x 20000 pixels
    limits = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, total_pixels=64 * 28 * 28,
                         max_decoded_pixels=150_000)
    with pytest.raises(InvalidArgument, match="decoding 8 frames of 200x100 is 160000 pixels, over the "
                                              "max_video_decoded_pixels limit of 150000 per request"):
        load_video(Source(frames, {}, "video[0]"), limits, ImageLimits(), GEO)
    assert decodes == []
    # sampled down to 6 frames, it fits: only the sampled frames count
    load_video(Source(frames, {"num_frames": 6}, "video[0]"), limits, ImageLimits(), GEO)
    assert len(decodes) == 6


def test_frame_list_longer_than_video_max_frames_is_refused_before_decoding(decodes):
    frames = json.dumps([frame_uri(2, 2)] * 12)
    limits = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, total_pixels=64 * 28 * 28, max_sampled=10)
    with pytest.raises(InvalidArgument, match="a frame list of 12 frames is over the video_max_frames limit"):
        load_video(Source(frames, {}, "video[0]"), limits, ImageLimits(), GEO)
    assert decodes == []
    assert int(load_video(Source(frames, {"num_frames": 8}, "video[0]"), limits, ImageLimits(), GEO).grid[0]) == 4


def test_frame_list_holds_one_full_size_frame_at_a_time():
    """Eight 1600x1200 frames (5.8 MB each as RGB): each is resized as soon as it is decoded, so the
    arrays alive at once stay far below two full frames (numpy's allocations are traced)."""
    frames = json.dumps([frame_uri(1600, 1200, (i * 20, 50, 90)) for i in range(8)])
    tracemalloc.start()
    try:
        load_video(Source(frames, {}, "video[0]"), SMALL, ImageLimits(), GEO)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1600 * 1200 * 3, peak


def test_frames_of_different_sizes_refused_from_headers(decodes):
    frames = json.dumps([frame_uri(56, 56), frame_uri(56, 84)])
    with pytest.raises(InvalidArgument, match=r"frames of different sizes \(video\[0\]\[0\] is 56x56, "
                                              r"video\[0\]\[1\] is 56x84\)"):
        load_video(Source(frames, {}, "video[0]"), SMALL, ImageLimits(), GEO)
    assert decodes == []


# --- containers ---------------------------------------------------------------------------------


@pytest.fixture
def container_decodes(monkeypatch):
    """Frames PyAV decoded (any container)."""
    import av

    count = itertools.count()
    seen = []
    real = av.container.InputContainer.decode

    def spy(self, *args, **kwargs):
        for frame in real(self, *args, **kwargs):
            seen.append(next(count))
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", spy)
    return seen


def test_container_decoded_pixel_budget_is_checked_from_the_header(container_decodes):
    data = make_video(n=12, width=112, height=84, fps=4)  # 12 frames of 9408 pixels; fps 2 samples 6 (0..11)
    limits = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, total_pixels=64 * 28 * 28,
                         max_decoded_pixels=12 * 112 * 84 - 1)
    with pytest.raises(InvalidArgument, match="decoding 12 frames of 112x84 is 112896 pixels, over the "
                                              "max_video_decoded_pixels limit of 112895"):
        load_video(Source(data, {}, "video[0]"), limits, ImageLimits(), GEO)
    assert container_decodes == []
    # num_frames 4 of 12 still decodes up to the last frame: the same charge
    with pytest.raises(InvalidArgument, match="max_video_decoded_pixels"):
        load_video(Source(data, {"num_frames": 4}, "video[0]"), limits, ImageLimits(), GEO)


def test_one_budget_for_all_videos_of_a_request(container_decodes):
    data = make_video(n=8, width=112, height=84, fps=4)
    limits = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, total_pixels=64 * 28 * 28,
                         max_decoded_pixels=int(1.5 * 8 * 112 * 84))
    assert len(load_videos([(data, {}, "video[0]")], limits, ImageLimits(), GEO)) == 1  # alone it fits
    with pytest.raises(InvalidArgument, match=r"video\[1\]: decoding 8 frames of 112x84 is 75264 pixels \(after "
                                              r"75264 for the request's other videos\)"):
        load_videos([(data, {}, "video[0]"), (data, {}, "video[1]")], limits, ImageLimits(), GEO)


def test_video_tokens_over_max_model_len_are_refused_before_decoding(decodes, container_decodes):
    data = make_video(n=8, width=112, height=84, fps=4)
    with pytest.raises(InvalidArgument, match="videos make .* tokens, which does not fit max_model_len=20"):
        load_videos([(data, {}, "video[0]")], SMALL, ImageLimits(), GEO, max_tokens=20)
    frames = json.dumps([frame_uri(2, 2)] * 8)  # tiny frames are enlarged to min_pixels: 4 tokens a pair
    with pytest.raises(InvalidArgument, match="does not fit max_model_len=15"):
        load_videos([(frames, {}, "video[0]")], SMALL, ImageLimits(), GEO, max_tokens=15)
    assert decodes == [] and container_decodes == []


class StepClock:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("kind", ["container", "frame list"])
def test_decode_deadline_is_checked_between_frames(kind, decodes, container_decodes):
    item = make_video(n=16, fps=4) if kind == "container" else json.dumps([frame_uri(56, 56)] * 16)
    limits = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, total_pixels=64 * 28 * 28,
                         decode_timeout_s=6)
    budget = DecodeBudget(limits, clock=StepClock())
    with pytest.raises(InvalidArgument, match=r"video\[0\]: decoding the request's videos took longer than the "
                                              r"video_decode_timeout_s limit \(6 s\)"):
        load_video(Source(item, {}, "video[0]"), limits, ImageLimits(), GEO, budget)
    assert len(decodes) + len(container_decodes) < 16  # stopped part way
    load_video(Source(item, {}, "video[0]"), limits, ImageLimits(), GEO)  # the real clock: in time


def test_rows_equal_normalizing_the_whole_stack():
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(5)]
    video = np.stack(frames).astype(np.float32)
    video = (video / 255.0 - np.asarray(GEO.mean, np.float32)) / np.asarray(GEO.std, np.float32)
    want, grid = patchify(video.transpose(0, 3, 1, 2), GEO.patch, GEO.merge, GEO.temporal)
    rows, got_grid = V._rows(frames, GEO)
    assert np.array_equal(rows, want) and got_grid.tolist() == grid.tolist()


# --- URLs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("address,private,loopback,allowed", [
    ("93.184.216.34", False, False, True),
    ("10.0.0.7", True, False, True),
    ("172.16.4.2", True, False, True),
    ("192.168.1.1", True, False, True),
    ("fd12:3456::1", True, False, True),
    ("10.0.0.7", False, False, False),
    ("127.0.0.1", True, False, False),  # allow_private never meant loopback
    ("::1", True, False, False),
    ("::ffff:127.0.0.1", True, False, False),
    ("169.254.169.254", True, True, False),  # cloud metadata: never
    ("::ffff:169.254.169.254", True, True, False),
    ("64:ff9b::a9fe:a9fe", True, True, False),  # NAT64 form of 169.254.169.254
    ("2002:a9fe:a9fe::1", True, True, False),  # 6to4 form
    ("fd00:ec2::254", True, True, False),  # AWS's IPv6 metadata, inside fc00::/7
    ("100.100.100.200", True, True, False),  # CGNAT (Alibaba's metadata): not RFC 1918
    ("fe80::1", True, True, False),
    ("0.0.0.0", True, True, False),
    ("::", True, True, False),
    ("224.0.0.1", True, True, False),
    ("ff02::1", True, True, False),
    ("240.0.0.1", True, True, False),
    ("127.0.0.1", False, True, True),  # the test-only switch
    ("127.8.9.1", False, True, True),
    ("::1", False, True, True),
    ("10.0.0.7", False, True, False),  # loopback only
])
def test_address_switches(monkeypatch, address, private, loopback, allowed):
    monkeypatch.setattr(urlfetch, "resolve", lambda host, port: [address])
    check = lambda: urlfetch.check("http://media.example/v.mp4", ("media.example",), "video[0]", private, loopback)  # noqa: E731
    if allowed:
        assert check().address == address
    else:
        with pytest.raises(InvalidArgument, match="non-public address"):
            check()


class Dripper(http.server.BaseHTTPRequestHandler):
    """/body: headers at once, then one body byte every 0.2 s; /headers: one header line every 0.2 s;
    /hop<n>: a redirect to /hop<n+1> after 0.4 s."""

    def do_GET(self):  # noqa: N802
        try:
            if self.path.startswith("/hop"):
                time.sleep(0.4)
                self.send_response(302)
                self.send_header("Location", f"/hop{int(self.path[4:]) + 1}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(100):
                    self.wfile.write(f"X-Slow-{i}: x\r\n".encode())
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up

    def log_message(self, *args):
        pass


@pytest.fixture
def dripper():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dripper)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.mark.parametrize("path", ["/body", "/headers", "/hop0"])
def test_fetch_deadline_covers_the_whole_fetch(dripper, path):
    """A server that drips its body or headers a byte at a time, or redirects slowly: each read is
    quick, the fetch is not. Refused at 1 s (the drips take 20 s, the redirects 1.6 s)."""
    limits = ImageLimits(url_allowlist=("127.0.0.1",), url_allow_loopback=True, url_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match="took longer than 1 s"):
        urlfetch.fetch_image(f"http://127.0.0.1:{dripper}{path}", "image[0]", limits)
    assert time.monotonic() - start < 1.8


def test_slow_name_lookup_counts_against_the_deadline(monkeypatch):
    monkeypatch.setattr(urlfetch, "resolve", lambda host, port: time.sleep(3) or ["93.184.216.34"])
    limits = ImageLimits(url_allowlist=("media.example",), url_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match="took longer than 0.5 s"):
        urlfetch.fetch_image("http://media.example/x.png", "image[0]", limits)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("key", ["image_url_timeout_s", "video_decode_timeout_s"])
@pytest.mark.parametrize("value", ["inf", "Infinity", "nan", "0", "-1"])
def test_time_limits_must_be_finite_and_positive(key, value):
    with pytest.raises(P.ParamError, match=f"preprocess: parameter '{key}' = '{value}': expected a finite number > 0"):
        P.read("preprocess", {key: value})
    assert getattr(P.read("preprocess", {key: "2.5"}), key) == 2.5


def test_new_parameters_defaults():
    pre = P.read("preprocess", {})
    assert pre.max_video_decoded_pixels == 4096 * 1920 * 1080 and pre.video_decode_timeout_s == 60
    assert pre.image_url_allow_loopback is False and pre.image_url_allow_private is False
    from tritonvl.handlers.preprocess.video import video_limits_from_params

    limits = video_limits_from_params(P.read("preprocess", {"max_video_decoded_pixels": "1000",
                                                            "video_decode_timeout_s": "3"}))
    assert (limits.max_decoded_pixels, limits.decode_timeout_s) == (1000, 3.0)
    assert video_limits_from_params(pre) == VideoLimits()


def test_url_video_cache_is_keyed_by_content():
    """The same URL twice, its content changed in between: the second request gets the new video."""
    first, second = make_video(n=8, fps=4, seed=1), make_video(n=8, fps=4, seed=2)
    files = {"/clip.mp4": (first, "video/mp4")}
    limits = ImageLimits(url_allowlist=("127.0.0.1",), url_allow_loopback=True)
    cache = ClipCache(1 << 26)
    with media_host(files) as (port, hits):
        url = f"http://127.0.0.1:{port}/clip.mp4"
        a = load_videos([(url, {}, "video[0]")], SMALL, limits, GEO, cache=cache)[0]
        files["/clip.mp4"] = (second, "video/mp4")
        b = load_videos([(url, {}, "video[0]")], SMALL, limits, GEO, cache=cache)[0]
        files["/clip.mp4"] = (first, "video/mp4")
        c = load_videos([(url, {}, "video[0]")], SMALL, limits, GEO, cache=cache)[0]
    assert hits == ["/clip.mp4"] * 3  # fetched each time: the content decides
    direct = load_video(Source(second, {}, "v"), SMALL, ImageLimits(), GEO)
    assert np.array_equal(b.pixel_values, direct.pixel_values)
    assert not np.array_equal(a.pixel_values, b.pixel_values)
    assert c is a and (cache.hits, cache.misses) == (1, 2)  # the first content again: a hit


def test_socket_is_closed_after_a_deadline(dripper):
    """The connection of a fetch cut at its deadline is closed (no socket left for the server to drip into)."""
    limits = ImageLimits(url_allowlist=("127.0.0.1",), url_allow_loopback=True, url_timeout_s=0.3)
    opened = []
    real = socket.create_connection

    def track(*args, **kwargs):
        sock = real(*args, **kwargs)
        opened.append(sock)
        return sock

    import unittest.mock

    with unittest.mock.patch.object(urlfetch.socket, "create_connection", track):
        with pytest.raises(InvalidArgument, match="took longer"):
            urlfetch.fetch_image(f"http://127.0.0.1:{dripper}/body", "image[0]", limits)
    assert opened and all(s.fileno() == -1 for s in opened)
