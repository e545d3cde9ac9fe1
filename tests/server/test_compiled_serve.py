"""The compiled decode step through a real tritonserver (`llm.compile=decode`, one bucket of 4 to keep
the compile at load short: every decode step, one request's too, is padded to 4 rows): greedy output
equals transformers' generate() token for token, text, an image, two images, a stream, and three
requests at once; the compile happened at load (the stub's log says so) and the server stays ready.
Bucket choice (1 against 4) and unpadded batch-1 steps: tests/unit/test_compiled_step.py."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from family_cases import PARITY
from helpers import infer_http, make_image, running_server

MAX = 10


@pytest.fixture(scope="module")
def cserver(model_dir, tmp_path_factory):
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")
    with running_server(model_dir, tmp_path_factory.mktemp("cserver"), ready_timeout=900,
                        overrides={"llm": {"compile": "decode", "compile_buckets": "4"}}) as srv:
        yield srv


@pytest.fixture(scope="module")
def ref(reference):
    return reference  # the session's generate() on the test model (tests/conftest.py)


def greedy(**fields):
    return {"temperature": 0.0, "max_tokens": MAX, "exclude_input_in_output": True, **fields}


def test_compiled_at_load(cserver):
    log = open(cserver.log_path, errors="replace").read()
    assert "compiled decode step: buckets [4] ready in" in log, log[-3000:]


@pytest.mark.parametrize("check", PARITY, ids=lambda c: c.__name__)
def test_equals_generate(cserver, ref, check):
    """text, an image, two images, a stream (tests/server/family_cases.py)."""
    check(cserver, ref, MAX)


def test_padded_batch_equals_generate(cserver, ref):
    jobs = [("Question number one?", []), ("Describe it.", [make_image(96, 80, seed=3)]), ("Count to ten.", [])]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda j: infer_http(cserver.http_url, **greedy(text_input=j[0], image=j[1])), jobs))
    for (text, images), out in zip(jobs, outs):
        assert out["output_ids"] == ref.generate(text, images, max_tokens=MAX), text
    assert requests.get(f"http://{cserver.http_url}/v2/health/ready", timeout=10).status_code == 200
