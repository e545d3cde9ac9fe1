"""Greedy output through the real server equals transformers' generate(), token for token."""

from __future__ import annotations

import json

import pytest
from helpers import data_uri, infer_http, joined, make_image, stream_grpc

MAX = 12


@pytest.fixture(scope="module")
def ref(reference):
    return reference  # the session's generate() on the test model (tests/conftest.py)


def greedy(**fields):
    return {"temperature": 0.0, "max_tokens": MAX, "exclude_input_in_output": True, **fields}


def test_text_only(server, ref):
    out = infer_http(server.http_url, **greedy(text_input="Tell me a story about a lighthouse."))
    assert out["output_ids"] == ref.generate("Tell me a story about a lighthouse.", max_tokens=MAX)
    assert out["finish_reason"] == "length"
    assert out["num_output_tokens"] == MAX
    assert out["num_input_tokens"] == ref.inputs("Tell me a story about a lighthouse.")["input_ids"].shape[1]
    assert out["num_image_tokens"] == 0


def test_one_image(server, ref):
    img = make_image(200, 150, seed=1)
    out = infer_http(server.http_url, **greedy(text_input="What is in the picture?", image=[img]))
    assert out["output_ids"] == ref.generate("What is in the picture?", [img], max_tokens=MAX)
    ids = ref.inputs("What is in the picture?", [img])["input_ids"]
    assert out["num_image_tokens"] == int((ids == ref.cfg["image_token_id"]).sum())
    assert out["num_input_tokens"] == ids.shape[1]


def test_image_changes_the_answer(server):
    a = infer_http(server.http_url, **greedy(text_input="Describe.", image=[make_image(120, 90, seed=2)]))
    b = infer_http(server.http_url, **greedy(text_input="Describe.", image=[make_image(120, 90, seed=3)]))
    assert a["output_ids"] != b["output_ids"]


def test_two_images_of_different_sizes(server, ref):
    imgs = [make_image(300, 120, seed=4), make_image(64, 200, seed=5)]
    out = infer_http(server.http_url, **greedy(text_input="Compare the two images.", image=imgs))
    assert out["output_ids"] == ref.generate("Compare the two images.", imgs, max_tokens=MAX)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_formats(server, ref, fmt):
    img = make_image(160, 112, seed=6, fmt=fmt)
    out = infer_http(server.http_url, **greedy(text_input=f"A {fmt} image.", image=[img]))
    assert out["output_ids"] == ref.generate(f"A {fmt} image.", [img], max_tokens=MAX)


def test_base64_and_data_uri_elements(server, ref):
    import base64

    img = make_image(100, 100, seed=8)
    want = ref.generate("Same picture.", [img], max_tokens=MAX)
    for element in (base64.b64encode(img).decode(), data_uri(img)):
        out = infer_http(server.http_url, **greedy(text_input="Same picture.", image=[element]))
        assert out["output_ids"] == want


def test_multi_turn_messages_with_image(server, ref):
    img = make_image(140, 100, seed=9, fmt="JPEG")
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(img, "image/jpeg")}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A picture of noise."},
        {"role": "user", "content": "Are you sure?"},
    ]
    out = infer_http(server.http_url, **greedy(text_input="ignored when messages are given",
                                               messages=json.dumps(messages)))
    assert out["output_ids"] == ref.generate(messages=messages, images=[img], max_tokens=MAX)


def test_stream_equals_one_shot(server, ref):
    img = make_image(180, 140, seed=10)
    fields = greedy(text_input="Stream this answer.", image=[img])
    one = infer_http(server.http_url, **fields)
    responses = stream_grpc(server.grpc_url, **fields, stream=True)
    assert len(responses) > 1
    streamed = joined(responses)
    assert streamed["output_ids"] == one["output_ids"] == ref.generate("Stream this answer.", [img], max_tokens=MAX)
    assert streamed["text_output"] == one["text_output"]
    assert streamed["finish_reason"] == "length"
    assert all("finish_reason" not in r for r in responses[:-1])


def test_non_stream_grpc_gets_exactly_one_response(server):
    responses = stream_grpc(server.grpc_url, **greedy(text_input="One response please."))
    assert len(responses) == 1 and responses[0]["finish_reason"] == "length"
