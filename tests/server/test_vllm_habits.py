"""Issue 15 on a real server: vLLM-backend habits (string numbers, max_tokens past the context), pixel
budgets (deployment bound, mm_processor_kwargs, per-image keys), logprobs against transformers' logits,
the raw-prompt mode, and the monitoring dashboard's queries against the server's real metrics.

One server of its own: the deployment's pixel bound is set below the model's (preprocess.max_pixels),
so the tests can tell the parameter from the model's processor default.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import Reference, infer_http, make_image, running_server, stream_grpc

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT_MAX_PIXELS = 56 * 56 * 16  # 50176, below the test model's own 78400
GEN = "/v2/models/qwen2_5_vl/generate"


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("habits"),
                        overrides={"preprocess": {"max_pixels": str(DEPLOYMENT_MAX_PIXELS)}}) as s:
        yield s


@pytest.fixture(scope="module")
def ref(model_dir):
    return Reference(str(model_dir))


def post(srv, body: dict) -> requests.Response:
    return requests.post(f"http://{srv.http_url}{GEN}", json=body, timeout=120)


def hf_grid(model_dir, image: bytes, **size) -> list[int]:
    """Hugging Face's Qwen2-VL image processor with these min/max_pixels: the image's grid (t, h, w)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir), **size)
    out = ip(images=[Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="np")
    return out["image_grid_thw"][0].tolist()


# ---- vLLM backend habits ---------------------------------------------------------------------------

def test_vllm_backend_string_numbers_are_served(srv):
    """vllm_backend's samples/client.py sends numbers and booleans as strings in sampling_parameters."""
    as_strings = {"temperature": "0.7", "top_p": "0.9", "top_k": "20", "max_tokens": "6", "ignore_eos": "true"}
    as_numbers = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 6, "ignore_eos": True}
    got = [infer_http(srv.http_url, text_input="Hello", seed=11, exclude_input_in_output=True,
                      sampling_parameters=json.dumps(sp)) for sp in (as_strings, as_numbers)]
    assert got[0]["num_output_tokens"] == 6 and got[0]["output_ids"] == got[1]["output_ids"]
    r = post(srv, {"text_input": "Hello", "sampling_parameters": json.dumps({"temperature": "warm"})})
    assert r.status_code == 400 and "temperature" in r.json()["error"]


def test_max_tokens_past_the_context_is_refused_at_once_with_the_numbers(srv, ref):
    prompt_tokens = ref.inputs("Hello")["input_ids"].shape[1]
    max_model_len = ref.cfg["text_config"]["max_position_embeddings"]
    for body in ({"text_input": "Hello", "max_tokens": 2_000_000_000},
                 {"text_input": "Hello", "sampling_parameters": '{"max_tokens": "2000000000"}'}):
        start = time.monotonic()
        r = requests.post(f"http://{srv.http_url}{GEN}", json=body, timeout=10)  # refused, not generated
        elapsed = time.monotonic() - start
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert f"prompt has {prompt_tokens} tokens" in error and f"max_model_len is {max_model_len}" in error, error
        assert elapsed < 1.0, elapsed
    # no max_tokens of its own: the default is cut to fit, never refused (vLLM's rule too)
    assert infer_http(srv.http_url, text_input="Hello", max_tokens=3)["num_output_tokens"] == 3


# ---- pixel budgets ---------------------------------------------------------------------------------

def test_max_pixels_gives_the_hugging_face_token_count(srv, model_dir):
    image = make_image(640, 480, seed=3)
    budget = 112 * 112
    t, h, w = hf_grid(model_dir, image, max_pixels=budget)
    expected = t * h * w // 4
    whole = infer_http(srv.http_url, text_input="Hi", image=[image], max_tokens=1,
                       mm_processor_kwargs=json.dumps({"max_pixels": budget}))
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    per_image = infer_http(srv.http_url, max_tokens=1, messages=json.dumps([{"role": "user", "content": [
        {"type": "image", "image": uri, "max_pixels": budget}, {"type": "text", "text": "Hi"}]}]))
    assert whole["num_image_tokens"] == per_image["num_image_tokens"] == expected == 12
    # without a budget of its own the image takes the deployment's (the parameter), not the model's
    t, h, w = hf_grid(model_dir, image, max_pixels=DEPLOYMENT_MAX_PIXELS)
    plain = infer_http(srv.http_url, text_input="Hi", image=[image], max_tokens=1)
    model_default = int(np.prod(hf_grid(model_dir, image))) // 4
    assert plain["num_image_tokens"] == t * h * w // 4 < model_default


def test_a_request_cannot_raise_the_deployment_bound(srv):
    image = base64.b64encode(make_image(640, 480, seed=3)).decode()
    too_many = DEPLOYMENT_MAX_PIXELS + 1
    r = post(srv, {"text_input": "Hi", "image": [image], "mm_processor_kwargs": json.dumps({"max_pixels": too_many})})
    assert r.status_code == 400
    assert f"max_pixels={too_many} is above this deployment's max_pixels ({DEPLOYMENT_MAX_PIXELS})" in r.json()["error"]
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}, "max_pixels": too_many}
    r = post(srv, {"messages": json.dumps([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}])})
    assert r.status_code == 400 and "messages[0].content[0].max_pixels" in r.json()["error"]
    r = post(srv, {"text_input": "Hi", "image": [image], "mm_processor_kwargs": '{"resized_height": 28}'})
    assert r.status_code == 400 and "unknown key" in r.json()["error"]


# ---- logprobs --------------------------------------------------------------------------------------

def test_logprobs_are_log_softmax_of_the_model_logits(srv, ref):
    import torch

    image = make_image(96, 64, seed=5)
    top = 3
    stream = stream_grpc(srv.grpc_url, text_input="Describe it", image=[image], max_tokens=6, temperature=0.0,
                         stream=True, return_logprobs=True, top_logprobs=top)
    ids = [t for r in stream for t in r["output_ids"]]
    entries = [json.loads(e) for r in stream for e in r.get("logprobs", [])]
    assert len(entries) == len(ids) == 6 and [e["token_id"] for e in entries] == ids
    inputs = ref.inputs("Describe it", [image])
    n = inputs["input_ids"].shape[1]
    full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.inference_mode():
        logits = ref.model(input_ids=full, attention_mask=torch.ones_like(full),
                           mm_token_type_ids=(full == ref.cfg["image_token_id"]).int(), **extra).logits
    expected = torch.log_softmax(logits[0, n - 1:-1].float(), dim=-1)  # the distribution of each step
    for step, (token, entry) in enumerate(zip(ids, entries)):
        assert abs(entry["logprob"] - expected[step, token].item()) < 1e-4, (step, entry)
        best = expected[step].topk(top)
        assert [a["token_id"] for a in entry["top_logprobs"]] == best.indices.tolist()
        assert np.allclose([a["logprob"] for a in entry["top_logprobs"]], best.values.tolist(), atol=1e-4)
        assert entry["token"] == ref.tok.decode([token])
    # not asked: no logprobs output at all
    plain = stream_grpc(srv.grpc_url, text_input="Describe it", max_tokens=2)
    assert all("logprobs" not in r for r in plain)


def test_logprobs_bad_input(srv):
    r = post(srv, {"text_input": "Hi", "return_logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and "top_logprobs=21" in r.json()["error"]
    r = post(srv, {"text_input": "Hi", "top_logprobs": 2})
    assert r.status_code == 400 and "needs return_logprobs" in r.json()["error"]


# ---- raw prompts -----------------------------------------------------------------------------------

def test_a_raw_prompt_equal_to_the_templated_one_gives_the_same_tokens(srv, ref):
    image = make_image(120, 90, seed=8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    # Qwen's template writes each image as <|vision_start|><|image_pad|><|vision_end|>: one pad per
    # image, which the server expands to the image's token count
    raw = ref.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in raw
    common = {"image": [image], "max_tokens": 8, "temperature": 0.0, "exclude_input_in_output": True}
    templated = infer_http(srv.http_url, text_input="What is it?", **common)
    as_raw = infer_http(srv.http_url, text_input=raw, apply_chat_template=False, **common)
    assert as_raw["output_ids"] == templated["output_ids"] == ref.generate("What is it?", [image], max_tokens=8)
    assert as_raw["num_input_tokens"] == templated["num_input_tokens"]


# ---- monitoring ------------------------------------------------------------------------------------

def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries use (histogram suffixes removed)."""
    board = json.loads((ROOT / "docs/monitoring/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs, "no queries in the dashboard"
    words = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
        words |= set(re.findall(r"\b((?:nv|tritonvl)_[a-z0-9_]+)", expr))
    return words


def test_every_dashboard_query_names_a_metric_the_server_exports(srv):
    infer_http(srv.http_url, text_input="Hi", max_tokens=2)  # histograms and counters have samples
    text = requests.get(srv.metrics_url, timeout=10).text
    exported = set(re.findall(r"^(\w+?)(?:\{| )", text, re.M))
    used = dashboard_metrics()
    assert {n for n in used if n.startswith("tritonvl_")} and {n for n in used if n.startswith("nv_")}
    # Triton exports nv_gpu_* only where it sees a GPU; this server runs on the CPU
    missing = sorted(n for n in used if n not in exported and not n.startswith("nv_gpu_"))
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    # tritonvl metrics carry the model version like Triton's own
    assert re.search(r'^tritonvl_\w+\{[^}]*version="1"', text, re.M), "no version label"
