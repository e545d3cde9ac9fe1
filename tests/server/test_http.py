"""HTTP /generate, /generate_stream (SSE) and errors, with curl-like plain requests."""

from __future__ import annotations

import base64
import json

import requests
from helpers import infer_http, make_image

GEN = "/v2/models/qwen2_5_vl/generate"


def post(server, path, body, **kw):
    return requests.post(f"http://{server.http_url}{path}", json=body, timeout=120, **kw)


def test_generate_with_image(server):
    img = base64.b64encode(make_image(96, 96, seed=11)).decode()
    body = {"text_input": "Hi", "image": [img], "max_tokens": 6, "temperature": 0, "exclude_input_in_output": True}
    r = post(server, GEN, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["finish_reason"] == "length" and out["num_output_tokens"] == 6 and len(out["output_ids"]) == 6
    same = infer_http(server.http_url, text_input="Hi", image=[base64.b64decode(img)], max_tokens=6,
                      temperature=0.0, exclude_input_in_output=True)
    assert out["output_ids"] == same["output_ids"] and out["text_output"] == same["text_output"]


def test_prompt_is_prefixed_unless_excluded(server):
    body = {"text_input": "Echo check", "max_tokens": 3, "temperature": 0}
    assert post(server, GEN, body).json()["text_output"].startswith("Echo check")
    body["exclude_input_in_output"] = True
    assert not post(server, GEN, body).json()["text_output"].startswith("Echo check")


def test_generate_stream_sse(server):
    img = base64.b64encode(make_image(96, 128, seed=12)).decode()
    body = {"text_input": "Stream", "image": [img], "max_tokens": 5, "temperature": 0, "stream": True}
    with post(server, GEN + "_stream", body, stream=True) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert len(events) >= 2 and all("error" not in e for e in events)
    assert events[-1]["finish_reason"] == "length"
    ids = [t for e in events for t in (e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]])]
    one = post(server, GEN, {**body, "stream": False, "exclude_input_in_output": True}).json()
    assert ids == one["output_ids"]
    assert "".join(e["text_output"] for e in events) == one["text_output"]


def test_corrupt_image_is_invalid_arg_and_server_stays_ready(server):
    bad = base64.b64encode(make_image(64, 64, seed=13)[:40]).decode()  # truncated PNG
    r = post(server, GEN, {"text_input": "x", "image": [bad], "max_tokens": 2})
    assert r.status_code == 400
    assert "image[0]" in r.json()["error"]
    r = post(server, GEN, {"text_input": "x", "image": ["bm90IGFuIGltYWdl"], "max_tokens": 2})
    assert r.status_code == 400 and "image[0]" in r.json()["error"]
    assert requests.get(f"http://{server.http_url}/v2/health/ready", timeout=5).status_code == 200
    ok = post(server, GEN, {"text_input": "still fine?", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["num_output_tokens"] == 2


def test_invalid_arg_over_grpc_stream(server):
    from helpers import stream_grpc
    from tritonclient.utils import InferenceServerException

    try:
        stream_grpc(server.grpc_url, text_input="x", top_p=1.5)
    except InferenceServerException as exc:
        assert "top_p" in exc.message(), exc.message()
    else:
        raise AssertionError("top_p=1.5 was accepted")
