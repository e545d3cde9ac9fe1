"""Overload and deadlines on a server configured with small limits."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

GEN = "/v2/models/qwen2_5_vl/generate"


@pytest.fixture(scope="module")
def limited(model_dir, tmp_path_factory):
    from tritonvl.handlers.tools.launcher import ServerProcess, repository_with

    repo = repository_with(tmp_path_factory.mktemp("limits") / "model_repository",
                           {"llm": {"max_num_seqs": "2", "max_num_batched_tokens": "256", "max_waiting": "2",
                                    "request_deadline_s": "4"}})
    with ServerProcess(str(model_dir), repo=repo, log_path=str(tmp_path_factory.mktemp("log") / "s.log")) as srv:
        yield srv


def post(srv, body, timeout=120):
    t = time.monotonic()
    r = requests.post(f"http://{srv.http_url}{GEN}", json=body, timeout=timeout)
    return r, time.monotonic() - t


def test_overload_is_refused_at_once_and_accepted_requests_are_unaffected(limited):
    body = {"text_input": "busy", "max_tokens": 60, "ignore_eos": True, "temperature": 0,
            "exclude_input_in_output": True}
    alone = post(limited, body)[0].json()["output_ids"]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: post(limited, body), range(12)))
    refused = [(r, dt) for r, dt in results if r.status_code != 200]
    served = [r for r, _ in results if r.status_code == 200]
    assert refused, "12 requests against 2 running + 2 waiting: some must be refused"
    assert served
    for r, _ in refused:
        # the engine answers UNAVAILABLE; Triton 2.51's /generate reports every model error as HTTP 400
        assert r.status_code in (400, 503) and "overloaded" in r.json()["error"], r.text
    assert min(dt for _, dt in refused) < 2.0  # refused at once, not after queueing
    assert all(r.json()["output_ids"] == alone for r in served)
    assert requests.get(f"http://{limited.http_url}/v2/health/ready", timeout=5).status_code == 200


def test_deadline_ends_a_long_request(limited):
    r, dt = post(limited, {"text_input": "forever", "max_tokens": 4000, "ignore_eos": True})
    assert r.status_code in (400, 503) and "deadline" in r.json()["error"], r.text
    assert dt < 15
