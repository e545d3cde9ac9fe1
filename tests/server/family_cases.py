"""Greedy parity with generate() through a real server, for one model family per importing module.

A module sets ``FAMILY`` (a preset of tiny_model.PRESETS) and star-imports this file: its server
(one per module) serves that family's tiny random model.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from family_ref import FamilyReference
from helpers import data_uri, infer_http, joined, make_image, running_server, stream_grpc

MAX = 10


@pytest.fixture(scope="module")
def family_dir(request, tmp_path_factory):
    from tritonvl.handlers.tools.tiny_model import PRESETS, build_tiny_model

    family = request.module.FAMILY
    return build_tiny_model(tmp_path_factory.mktemp(family) / family, PRESETS[family])


@pytest.fixture(scope="module")
def family_server(family_dir, tmp_path_factory):
    with running_server(family_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def family_ref(family_dir):
    return FamilyReference(str(family_dir))


def greedy(**fields):
    return {"temperature": 0.0, "max_tokens": MAX, "exclude_input_in_output": True, **fields}


def test_family_is_read_from_config(request, family_dir):
    from tritonvl.handlers.modelinfo import load_model_info

    assert load_model_info(family_dir).family == request.module.FAMILY


def test_text(family_server, family_ref):
    out = infer_http(family_server.http_url, **greedy(text_input="Tell me about lighthouses."))
    assert out["output_ids"] == family_ref.generate("Tell me about lighthouses.", max_tokens=MAX)


def test_one_image(family_server, family_ref):
    img = make_image(200, 150, seed=1)
    out = infer_http(family_server.http_url, **greedy(text_input="What is in the picture?", image=[img]))
    assert out["output_ids"] == family_ref.generate("What is in the picture?", [img], max_tokens=MAX)


def test_two_images(family_server, family_ref):
    imgs = [make_image(300, 120, seed=4), make_image(64, 200, seed=5)]
    out = infer_http(family_server.http_url, **greedy(text_input="Compare the two images.", image=imgs))
    assert out["output_ids"] == family_ref.generate("Compare the two images.", imgs, max_tokens=MAX)


def test_stream_equals_generate(family_server, family_ref):
    img = make_image(180, 140, seed=10)
    responses = stream_grpc(family_server.grpc_url, **greedy(text_input="Stream this.", image=[img]), stream=True)
    assert len(responses) > 1
    assert joined(responses)["output_ids"] == family_ref.generate("Stream this.", [img], max_tokens=MAX)


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
