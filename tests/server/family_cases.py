"""Greedy parity with generate() through a real server, for one model family per importing module.

A module sets ``FAMILY`` (a preset of tiny_model.PRESETS) and star-imports this file: its server
(one per module) serves that family's tiny random model. Videos: the reference takes the rows the
server's own intake builds (see tests/family_ref.py); what is checked is their way through the tower,
the prompt (Qwen3-VL: timestamps per temporal patch), the rope positions and the engine.

The text / image / two images / stream checks are plain functions (``PARITY``) that other modules run
against their own servers (quantized, compiled, tensor parallel).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from family_ref import VIDEO, FamilyReference, video_limits
from helpers import data_uri, infer_http, joined, make_image, running_server, stream_grpc
from videos import intake, make_video

MAX = 10
VIDEO_LIMITS = video_limits()  # the server's preprocess gets VIDEO
CLIP = make_video(n=8, width=112, height=84, fps=8, seed=1)  # 4 frames sampled: 2 temporal patches


@pytest.fixture(scope="module")
def family_dir(request, tmp_path_factory):
    from tritonvl.handlers.tiny_model import PRESETS, build_tiny_model

    family = request.module.FAMILY
    return build_tiny_model(tmp_path_factory.mktemp(family) / family, PRESETS[family])


@pytest.fixture(scope="module")
def family_server(family_dir, tmp_path_factory):
    with running_server(family_dir, tmp_path_factory.mktemp("server"), overrides={"preprocess": VIDEO}) as srv:
        yield srv


@pytest.fixture(scope="module")
def family_ref(family_dir):
    return FamilyReference(str(family_dir))


@pytest.fixture(scope="module")
def rows(family_ref):
    """A video element (and its part keys) -> what the reference takes: the server intake's rows."""
    return intake(family_ref.ip, VIDEO_LIMITS)


def greedy(**fields):
    return {"temperature": 0.0, "max_tokens": MAX, "exclude_input_in_output": True, **fields}


def test_family_is_read_from_config(request, family_dir):
    from tritonvl.handlers.modelinfo import load_model_info

    assert load_model_info(family_dir).family == request.module.FAMILY


# ---- parity checks shared with other servers' modules (quantized, compiled, tensor parallel) --------
# Each takes a server, a reference (``generate(text, images, max_tokens=)``) and the answer length.


def expect(ref, got: list[int], text: str, images=(), max_tokens: int = MAX) -> None:
    """The served greedy ids equal generate()'s. A reference with ``near_ties`` set (a checkpoint with
    dynamic activation quantization: tests/server/test_quantized.py) accepts one kind of divergence:
    at the first differing step, the served token's logit in generate()'s own step is within
    ``near_ties`` of that step's best (a near-tie that the order of the float operations decides);
    the tokens after it are not compared (they continue a different text)."""
    tolerance = getattr(ref, "near_ties", None)
    want = ref.generate(text, list(images), max_tokens=max_tokens)
    if got == want or tolerance is None:
        assert got == want
        return
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert len(got) > k and len(want) > k, (got, want)  # one a prefix of the other: not a near-tie
    logits = ref.step_logits(text, list(images), k)  # generate()'s logits at step k
    gap = float(logits.max() - logits[got[k]])
    assert gap <= tolerance, (f"step {k}: served {got[k]}, generate() {want[k]}: logit gap {gap:.4f} "
                              f"> {tolerance}", got, want)


def check_text(srv, ref, max_tokens: int = MAX) -> None:
    fields = greedy(text_input="Tell me about lighthouses.", max_tokens=max_tokens)
    expect(ref, infer_http(srv.http_url, **fields)["output_ids"], fields["text_input"], max_tokens=max_tokens)


def check_one_image(srv, ref, max_tokens: int = MAX) -> None:
    img = make_image(200, 150, seed=1)
    out = infer_http(srv.http_url, **greedy(text_input="What is in the picture?", image=[img], max_tokens=max_tokens))
    expect(ref, out["output_ids"], "What is in the picture?", [img], max_tokens)


def check_two_images(srv, ref, max_tokens: int = MAX) -> None:
    imgs = [make_image(300, 120, seed=4), make_image(64, 200, seed=5)]
    out = infer_http(srv.http_url, **greedy(text_input="Compare the two images.", image=imgs, max_tokens=max_tokens))
    expect(ref, out["output_ids"], "Compare the two images.", imgs, max_tokens)


def check_stream(srv, ref, max_tokens: int = MAX) -> tuple[dict, list[int]]:
    """A gRPC stream with an image equals generate(); returns the request's fields and the ids it gave
    (a caller may ask again, e.g. to see the prefix cache)."""
    img = make_image(180, 140, seed=10)
    fields = greedy(text_input="Stream this.", image=[img], max_tokens=max_tokens)
    responses = stream_grpc(srv.grpc_url, **fields, stream=True)
    assert len(responses) > 1
    got = joined(responses)["output_ids"]
    expect(ref, got, "Stream this.", [img], max_tokens)
    return fields, got


PARITY = [check_text, check_one_image, check_two_images, check_stream]


def test_text(family_server, family_ref):
    check_text(family_server, family_ref)


def test_one_image(family_server, family_ref):
    check_one_image(family_server, family_ref)


def test_two_images(family_server, family_ref):
    check_two_images(family_server, family_ref)


def test_stream_equals_generate(family_server, family_ref):
    check_stream(family_server, family_ref)


def test_messages_with_image_url(family_server, family_ref):
    img = make_image(140, 100, seed=9)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(img)}},
                                             {"type": "text", "text": "What is this?"}]}]
    out = infer_http(family_server.http_url, **greedy(text_input="", messages=json.dumps(messages)))
    assert out["output_ids"] == family_ref.generate(messages=messages, images=[img], max_tokens=MAX)


def test_concurrent(family_server, family_ref):
    specs = [("Describe.", [make_image(120 + 20 * i, 90, seed=20 + i)] * (i % 3)) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda s: infer_http(family_server.http_url, **greedy(text_input=s[0], image=s[1])),
                             specs))
    for (text, images), out in zip(specs, outs):
        assert out["output_ids"] == family_ref.generate(text, images, max_tokens=MAX)


def test_one_video(family_server, family_ref, rows):
    out = infer_http(family_server.http_url, **greedy(text_input="What happens?", video=[CLIP]))
    assert out["output_ids"] == family_ref.generate("What happens?", videos=[rows(CLIP)], max_tokens=MAX)


def test_video_stream(family_server, family_ref, rows):
    clip = make_video(n=12, width=96, height=64, fps=4, seed=2)  # 3 s at 2 fps: 6 frames, 3 patches
    responses = stream_grpc(family_server.grpc_url, **greedy(text_input="Narrate.", video=[clip]), stream=True)
    assert len(responses) > 1
    assert joined(responses)["output_ids"] == family_ref.generate("Narrate.", videos=[rows(clip)], max_tokens=MAX)


def test_video_url_part_then_image(family_server, family_ref, rows):
    img = make_image(120, 90, seed=5)
    part = {"type": "video_url", "video_url": {"url": data_uri(CLIP, "video/mp4")}, "num_frames": 6}
    messages = [{"role": "user", "content": [part, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    out = infer_http(family_server.http_url, **greedy(text_input="", messages=json.dumps(messages), image=[img]))
    ref_msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    want = family_ref.generate(messages=ref_msgs, images=[img], videos=[rows(CLIP, part)], max_tokens=MAX)
    assert out["output_ids"] == want


def test_concurrent_videos(family_server, family_ref, rows):
    clips = [make_video(n=8 + 4 * i, width=80, height=80, fps=8, seed=10 + i) for i in range(2)]
    jobs = [{"video": [c]} for c in clips] + [{"video": [clips[0]], "image": [make_image(100, 80, seed=30)]}, {}]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda j: infer_http(family_server.http_url, **greedy(text_input="Go.", **j)), jobs))
    for job, out in zip(jobs, outs):
        want = family_ref.generate("Go.", images=job.get("image", ()), videos=[rows(v) for v in job.get("video", ())],
                                   max_tokens=MAX)
        assert out["output_ids"] == want
