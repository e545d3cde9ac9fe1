"""Video through the real server (Qwen2.5-VL): greedy parity with generate(), the content-hash cache,
and a bad-video suite refused with INVALID_ARG while the server stays ready.

The reference gets the same patch rows the server builds (handlers/preprocess/video.py: transformers'
video processor needs torchvision, which does not import here); that those rows follow transformers'
patch layout is tests/unit/test_video_intake.py. What is checked here: the rows' path through vision_encoder
and the engine (video embeddings, video_grid_thw, second_per_grid_ts and mm_token_type_ids 2 in the
mRoPE positions) equals generate() given pixel_values_videos.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from family_ref import FamilyReference
from helpers import infer_http, joined, make_image, media_host, metrics, running_server, stream_grpc
from videos import frame_list, intake, make_video

from tritonvl.handlers.preprocess.video_rules import VideoLimits

MAX = 10
# small budgets so a tiny model's videos stay a few hundred tokens; limits low enough to hit cheaply
SETTINGS = {"video_min_pixels": 4 * 28 * 28, "video_max_pixels": 24 * 28 * 28, "video_total_pixels": 96 * 28 * 28,
            "max_video_seconds": 30, "max_video_frames": 300, "max_video_bytes": 2_000_000,
            # URLs of this host are fetched, though it is loopback (the test-only loopback switch)
            "image_url_allowlist": "127.0.0.1", "image_url_allow_loopback": "true"}
LIMITS = VideoLimits(max_seconds=30, max_frames=300, max_bytes=2_000_000, min_pixels=4 * 28 * 28,
                     max_pixels=24 * 28 * 28, total_pixels=96 * 28 * 28)
# 8 frames at 8 fps: 2 fps gives 2, raised to the 4-frame floor: sampled at 4 fps, second_per_grid_t 0.5
# (not the 1.0 generate() assumes when second_per_grid_ts is missing)
CLIP = make_video(n=8, width=112, height=84, fps=8, seed=1)


@pytest.fixture(scope="module")
def vserver(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("server"), overrides={"preprocess": SETTINGS}) as srv:
        yield srv


@pytest.fixture(scope="module")
def ref(model_dir):
    return FamilyReference(str(model_dir))


@pytest.fixture(scope="module")
def rows(ref):
    """A video element (and its part keys) -> the reference's rows (the server intake's)."""
    return intake(ref.ip, LIMITS)


def greedy(**fields):
    return {"temperature": 0.0, "max_tokens": MAX, "exclude_input_in_output": True, **fields}


def uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_one_video_equals_generate(vserver, ref, rows):
    clip = rows(CLIP)
    assert clip[2] == pytest.approx(0.5)
    out = infer_http(vserver.http_url, **greedy(text_input="What happens in the video?", video=[CLIP]))
    assert out["output_ids"] == ref.generate("What happens in the video?", videos=[clip], max_tokens=MAX)


def test_stream_equals_generate(vserver, ref, rows):
    responses = stream_grpc(vserver.grpc_url, **greedy(text_input="Narrate.", video=[CLIP]), stream=True)
    assert len(responses) > 1
    assert joined(responses)["output_ids"] == ref.generate("Narrate.", videos=[rows(CLIP)], max_tokens=MAX)


@pytest.mark.parametrize("fmt", ["webm", "gif"])
def test_formats(vserver, ref, rows, fmt):
    clip = make_video(n=8, fps=4, fmt=fmt, seed=3)
    out = infer_http(vserver.http_url, **greedy(text_input="A clip.", video=[clip]))
    assert out["output_ids"] == ref.generate("A clip.", videos=[rows(clip)], max_tokens=MAX)


def test_messages_video_url_then_image(vserver, ref, rows):
    img = make_image(120, 90, seed=5)
    part = {"type": "video_url", "video_url": {"url": uri(CLIP)}, "num_frames": 6, "max_pixels": 12 * 28 * 28}
    messages = [{"role": "user", "content": [part, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    out = infer_http(vserver.http_url, **greedy(text_input="", messages=json.dumps(messages), image=[img]))
    ref_msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    want = ref.generate(messages=ref_msgs, images=[img], videos=[rows(CLIP, part)], max_tokens=MAX)
    assert out["output_ids"] == want


@pytest.mark.parametrize("fps", [1, 0.5])
def test_frame_list_part(vserver, ref, rows, fps):
    """The same frames at two rates, one after the other: second_per_grid_t 2 then 4 (time positions past
    the text after the video; and the prefix cache must not hand the second the first one's K/V)."""
    frames = frame_list(5, seed=7)
    messages = [{"role": "user", "content": [{"type": "video", "video": json.loads(frames), "fps": fps},
                                             {"type": "text", "text": "Frames."}]}]
    out = infer_http(vserver.http_url, **greedy(text_input="", messages=json.dumps(messages)))
    clip = rows(json.loads(frames), {"fps": fps})
    assert clip[2] == pytest.approx(2 / fps)
    ref_msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Frames."}]}]
    assert out["output_ids"] == ref.generate(messages=ref_msgs, videos=[clip], max_tokens=MAX)


def test_concurrent_videos_and_images(vserver, ref, rows):
    clips = [make_video(n=8 + 2 * i, fps=8, seed=10 + i) for i in range(3)]
    jobs = [{"video": [c]} for c in clips] + [{"image": [make_image(100, 80, seed=30)]}, {}]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda j: infer_http(vserver.http_url, **greedy(text_input="Go.", **j)), jobs))
    for job, out in zip(jobs, outs):
        want = ref.generate("Go.", images=job.get("image", ()), videos=[rows(v) for v in job.get("video", ())],
                            max_tokens=MAX)
        assert out["output_ids"] == want


def test_same_video_hits_the_embedding_cache(vserver):
    clip = make_video(n=8, fps=8, seed=40)
    before = metrics(vserver, "vision_encoder").get("tritonvl_image_cache_hits_total", 0)
    a = infer_http(vserver.http_url, **greedy(text_input="Once.", video=[clip]))
    b = infer_http(vserver.http_url, **greedy(text_input="Once.", video=[clip]))
    assert a["output_ids"] == b["output_ids"]
    assert metrics(vserver, "vision_encoder")["tritonvl_image_cache_hits_total"] >= before + 1


def test_video_and_image_urls_of_an_allow_listed_host(vserver, ref, rows):
    """vLLM's habit: video_url / image_url parts with http URLs, fetched from an allow-listed host."""
    img = make_image(100, 70, seed=8)
    with media_host({"/clip.mp4": (CLIP, "video/mp4"), "/photo.png": (img, "image/png")}) as (port, hits):
        base = f"http://127.0.0.1:{port}"
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"{base}/clip.mp4"}},
                                                 {"type": "image_url", "image_url": {"url": f"{base}/photo.png"}},
                                                 {"type": "text", "text": "Both."}]}]
        out = infer_http(vserver.http_url, **greedy(text_input="", messages=json.dumps(messages)))
        as_tensor = infer_http(vserver.http_url, **greedy(text_input="Tensor.", video=[f"{base}/clip.mp4"]))
        missing = requests.post(f"http://{vserver.http_url}{GEN}", timeout=60,
                                json={"text_input": "x", "video": [f"{base}/gone.mp4"], "max_tokens": 2})
    assert sorted(hits) == ["/clip.mp4", "/clip.mp4", "/gone.mp4", "/photo.png"]
    ref_msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Both."}]}]
    assert out["output_ids"] == ref.generate(messages=ref_msgs, images=[img], videos=[rows(CLIP)], max_tokens=MAX)
    assert as_tensor["output_ids"] == ref.generate("Tensor.", videos=[rows(CLIP)], max_tokens=MAX)
    assert missing.status_code == 400 and "the URL answered HTTP 404" in missing.json()["error"], missing.text


def test_a_video_sent_again_is_not_decoded_again(vserver, ref, rows):
    """preprocess' video cache (one per instance): the same element and sampling keys skip decoding
    (hits counted); other keys are another entry; what comes out of the cache equals decoding it."""
    clip = make_video(n=10, fps=5, seed=41)

    def count():
        m = metrics(vserver, "preprocess")
        return m.get("tritonvl_video_cache_hits_total", 0), m.get("tritonvl_video_cache_misses_total", 0)

    hits0, misses0 = count()
    # three sends over preprocess' two instances (a cache each): one instance sees it twice at least
    outs = [infer_http(vserver.http_url, **greedy(text_input="Again?", video=[clip]))["output_ids"] for _ in range(3)]
    hits, misses = count()
    assert hits - hits0 >= 1 and misses - misses0 <= 2 and hits - hits0 + misses - misses0 == 3, (hits, misses)
    other = infer_http(vserver.http_url, **greedy(text_input="Again?", video=[clip],
                                                  mm_processor_kwargs=json.dumps({"num_frames": 6})))
    assert count()[1] == misses + 1
    assert outs[0] == outs[1] == outs[2] == ref.generate("Again?", videos=[rows(clip)], max_tokens=MAX)
    assert other["output_ids"] == ref.generate("Again?", videos=[rows(clip, {"num_frames": 6})], max_tokens=MAX)


def test_mm_processor_kwargs_sample_every_video_under_part_keys(vserver, ref, rows):
    """vLLM's habit: mm_processor_kwargs {fps | num_frames | max_frames | total_pixels} for every video;
    a part's own fps or num_frames replaces the request's."""
    clip = make_video(n=16, fps=8, seed=42)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "video", "fps": 4},
                                             {"type": "text", "text": "Two."}]}]
    out = infer_http(vserver.http_url, **greedy(text_input="", messages=json.dumps(messages), video=[clip, clip],
                                                mm_processor_kwargs=json.dumps({"num_frames": 4})))
    ref_msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "video"}, {"type": "text", "text": "Two."}]}]
    want = ref.generate(messages=ref_msgs, videos=[rows(clip, {"num_frames": 4}), rows(clip, {"fps": 4})],
                        max_tokens=MAX)
    assert out["output_ids"] == want


GEN = "/v2/models/qwen2_5_vl/generate"
BAD = [
    ("corrupt bytes", {"video": [base64.b64encode(b"\x00\x01not a video" * 40).decode()]}, "not a decodable video"),
    ("truncated mp4", {"video": [base64.b64encode(CLIP[:400]).decode()]}, "video[0]"),
    ("empty element", {"video": [""]}, "empty video"),
    ("bad base64 data URI", {"video": ["data:video/mp4;base64,@@@@"]}, "invalid base64"),
    ("not a video media type", {"video": ["data:text/plain;base64,aGVsbG8="]}, "is not a video"),
    ("URL off the allow-list", {"video": ["https://example.com/clip.mp4"]}, "not on the URL allow-list"),
    ("empty frame list", {"video": ["[]"]}, "frame list is empty"),
    ("bad frame", {"video": [json.dumps(["data:image/png;base64,AAAA"])]}, "video[0][0]"),
    ("too long", {"video": [base64.b64encode(make_video(n=124, width=56, height=56, fps=4)).decode()]},
     "longer than the 30 s limit"),
    ("too many frames", {"video": [base64.b64encode(make_video(n=320, width=56, height=56, fps=30)).decode()]},
     "more than 300 frames"),
    ("too many bytes", {"video": ["A" * 2_800_000]}, "byte limit"),
    ("too many pixels", {"video": [base64.b64encode(make_video(n=4, width=112, height=84, fps=4)).decode()],
                         "messages": json.dumps([{"role": "user", "content": [
                             {"type": "video", "max_pixels": 10**9}, {"type": "text", "text": "x"}]}])},
     "may lower the video budget"),
    ("too many frames asked", {"video": [base64.b64encode(CLIP).decode()],
                               "messages": json.dumps([{"role": "user", "content": [
                                   {"type": "video", "num_frames": 64}, {"type": "text", "text": "x"}]}])},
     "64 frames to sample from a video of 8"),
    ("three videos", {"video": [base64.b64encode(CLIP).decode()] * 3}, "over the limit of 2"),
    ("mm_processor_kwargs above the bound", {"video": [base64.b64encode(CLIP).decode()],
                                             "mm_processor_kwargs": json.dumps({"max_frames": 10**6})},
     "mm_processor_kwargs.max_frames=1000000 is above"),
    ("unreferenced video", {"video": [base64.b64encode(CLIP).decode()],
                            "messages": json.dumps([{"role": "user", "content": "no video part"}])},
     "not referenced by a video part"),
]


@pytest.mark.parametrize("name,fields,message", BAD, ids=[b[0] for b in BAD])
def test_bad_video_refused(vserver, name, fields, message):
    body = {"text_input": "Describe.", "max_tokens": 4, **fields}
    r = requests.post(f"http://{vserver.http_url}{GEN}", json=body, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    assert message in r.json()["error"], r.text
    assert requests.get(f"http://{vserver.http_url}/v2/health/ready", timeout=5).status_code == 200


def test_still_serving_after_bad_videos(vserver, ref, rows):
    out = infer_http(vserver.http_url, **greedy(text_input="After.", video=[CLIP]))
    assert out["output_ids"] == ref.generate("After.", videos=[rows(CLIP)], max_tokens=MAX)
