"""The compiled decode step through a real tritonserver (`llm.compile=decode`, buckets 1 and 4 to
keep the compile at load short): greedy output equals transformers' generate() token for token,
text, an image, a stream, and three requests at once (decode steps padded to the bucket of 4); the
compile happened at load (the stub's log says so) and the server stays ready."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import Reference, infer_http, joined, make_image, running_server, stream_grpc

MAX = 10


@pytest.fixture(scope="module")
def cserver(model_dir, tmp_path_factory):
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")
    with running_server(model_dir, tmp_path_factory.mktemp("cserver"), ready_timeout=900,
                        overrides={"llm": {"compile": "decode", "compile_buckets": "1,4"}}) as srv:
        yield srv


@pytest.fixture(scope="module")
def ref(model_dir):
    return Reference(str(model_dir))


def greedy(**fields):
    return {"temperature": 0.0, "max_tokens": MAX, "exclude_input_in_output": True, **fields}


def test_compiled_at_load(cserver):
    log = open(cserver.log_path, errors="replace").read()
    assert "compiled decode step: buckets [1, 4] ready in" in log, log[-3000:]


def test_text_equals_generate(cserver, ref):
    prompt = "Tell me a story about a lighthouse."
    assert infer_http(cserver.http_url, **greedy(text_input=prompt))["output_ids"] == ref.generate(prompt, max_tokens=MAX)


def test_image_equals_generate(cserver, ref):
    img = make_image(200, 150, seed=1)
    out = infer_http(cserver.http_url, **greedy(text_input="What is in the picture?", image=[img]))
    assert out["output_ids"] == ref.generate("What is in the picture?", [img], max_tokens=MAX)


def test_stream_equals_generate(cserver, ref):
    img = make_image(180, 140, seed=10)
    responses = stream_grpc(cserver.grpc_url, **greedy(text_input="Stream this answer.", image=[img]), stream=True)
    assert len(responses) > 1
    assert joined(responses)["output_ids"] == ref.generate("Stream this answer.", [img], max_tokens=MAX)


def test_padded_batch_equals_generate(cserver, ref):
    jobs = [("Question number one?", []), ("Describe it.", [make_image(96, 80, seed=3)]), ("Count to ten.", [])]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda j: infer_http(cserver.http_url, **greedy(text_input=j[0], image=j[1])), jobs))
    for (text, images), out in zip(jobs, outs):
        assert out["output_ids"] == ref.generate(text, images, max_tokens=MAX), text
    assert requests.get(f"http://{cserver.http_url}/v2/health/ready", timeout=10).status_code == 200
