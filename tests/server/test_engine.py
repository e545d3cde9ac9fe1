"""The continuous-batching engine through the real server: parity under load, preemption, prefix
cache, seeded sampling, cancellation."""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
from helpers import GaugePeak, infer_http, joined, make_image, metrics, stream_grpc, wait_for


@pytest.fixture(scope="module")
def ref(reference):
    return reference  # the session's generate() on the test model (tests/conftest.py)


def mixed_cases(n: int, max_images: int = 3) -> list[dict]:
    cases = []
    for i in range(n):
        k = i % (max_images + 1)
        images = [make_image(56 + 40 * ((i + j) % 4), 70 + 30 * ((i * 3 + j) % 5), seed=1000 + 10 * i + j)
                  for j in range(k)]
        cases.append({"text_input": f"Request {i}: what do you see? " + "more words " * (i % 5),
                      "image": images, "max_tokens": 4 + (i * 7) % 13, "stream": i % 2 == 1})
    return cases


def run_case(url_http, url_grpc, case, **extra):
    fields = {"text_input": case["text_input"], "max_tokens": case["max_tokens"], "temperature": 0.0,
              "exclude_input_in_output": True, **extra}
    if case["image"]:
        fields["image"] = case["image"]
    if case["stream"]:
        return joined(stream_grpc(url_grpc, **fields, stream=True))
    return infer_http(url_http, **fields)


def check_parity(server, ref, cases):
    with ThreadPoolExecutor(len(cases)) as pool:
        outs = list(pool.map(lambda c: run_case(server.http_url, server.grpc_url, c), cases))
    for case, out in zip(cases, outs):
        want = ref.generate(case["text_input"], case["image"], max_tokens=case["max_tokens"])
        assert out["output_ids"] == want, case["text_input"]
        assert out["finish_reason"] == "length"


def test_parity_with_32_mixed_requests_in_flight(server, ref):
    before = metrics(server)
    with GaugePeak(server, "tritonvl_num_requests_running") as running:
        check_parity(server, ref, mixed_cases(32))
    after = metrics(server)
    assert after["tritonvl_generation_tokens_total"] > before.get("tritonvl_generation_tokens_total", 0)
    # "in flight" means batched together: the engine ran many of them in one step at some point
    assert running.peak >= 8, f"at most {running.peak:g} requests ran together ({running.samples} samples)"


@pytest.fixture(scope="module")
def small_kv_server(model_dir, tmp_path_factory):
    """A second server whose KV cache is too small for the load: it must preempt."""
    from tritonvl.handlers.tools.launcher import ServerProcess, repository_with

    # 24 blocks of 16 tokens (the test model: 3 layers x 2 kv heads x 16 dims x fp32 = 768 B / token)
    repo = repository_with(tmp_path_factory.mktemp("repo") / "model_repository",
                           {"llm": {"kv_cache_bytes": str(24 * 16 * 768)}})
    log = tmp_path_factory.mktemp("srv2") / "tritonserver.log"
    with ServerProcess(str(model_dir), repo=repo, log_path=str(log)) as srv:
        yield srv


def test_parity_under_preemption(small_kv_server, ref):
    cases = [{**c, "max_tokens": 24 + i % 9} for i, c in enumerate(mixed_cases(16, max_images=1))]
    with GaugePeak(small_kv_server, "tritonvl_num_requests_running") as running:
        check_parity(small_kv_server, ref, cases)
    assert metrics(small_kv_server)["tritonvl_preemptions_total"] > 0
    assert running.peak > 1, f"at most {running.peak:g} requests ran together"
    assert wait_for(lambda: metrics(small_kv_server)["tritonvl_kv_cache_usage_ratio"] == 0)


def test_prefix_cache_same_image_hits_and_different_images_do_not(server, ref):
    img = make_image(168, 112, seed=4242)
    q1 = {"text_input": "First question about this picture.", "image": [img], "max_tokens": 6, "stream": False}
    q2 = {**q1, "text_input": "First question about this picture. And a second one."}
    run_case(server.http_url, server.grpc_url, q1)
    m0 = metrics(server)
    out = run_case(server.http_url, server.grpc_url, q2)
    m1 = metrics(server)
    hits = m1["tritonvl_prefix_cache_hit_tokens_total"] - m0["tritonvl_prefix_cache_hit_tokens_total"]
    n_img = ref.inputs(q1["text_input"], [img])["input_ids"].eq(ref.cfg["image_token_id"]).sum().item()
    assert hits >= n_img, f"only {hits} cached tokens reused for an image of {n_img} tokens"
    computed = m1["tritonvl_computed_prompt_tokens_total"] - m0["tritonvl_computed_prompt_tokens_total"]
    assert computed == out["num_input_tokens"] - hits if "num_input_tokens" in out else computed < 200
    assert out["output_ids"] == ref.generate(q2["text_input"], [img], max_tokens=6)

    # same size, different pixels: only the text before the image may be shared
    other = make_image(168, 112, seed=4343)
    ids = ref.inputs(q1["text_input"], [other])["input_ids"][0].tolist()
    first_image = ids.index(ref.cfg["image_token_id"])
    m2 = metrics(server)
    out = run_case(server.http_url, server.grpc_url, {**q2, "image": [other]})
    hits = metrics(server)["tritonvl_prefix_cache_hit_tokens_total"] - m2["tritonvl_prefix_cache_hit_tokens_total"]
    assert hits <= first_image, f"{hits} cached tokens reused across different images"
    assert out["output_ids"] == ref.generate(q2["text_input"], [other], max_tokens=6)


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(server):
    fields = {"text_input": "Sample me.", "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 50,
              "seed": 1234, "exclude_input_in_output": True}
    alone = infer_http(server.http_url, **fields)["output_ids"]
    busy = [{"text_input": f"noise {i}", "max_tokens": 20, "temperature": 1.0, "stream": False, "image": []}
            for i in range(12)]
    with ThreadPoolExecutor(13) as pool:
        noise = [pool.submit(run_case, server.http_url, server.grpc_url, c) for c in busy]
        time.sleep(0.05)
        again = pool.submit(infer_http, server.http_url, **fields).result()["output_ids"]
        [f.result() for f in noise]
    assert again == alone
    other = infer_http(server.http_url, **{**fields, "seed": 99})["output_ids"]
    assert other != alone


def _tensors(grpcclient, values: dict) -> list:
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, arr in values.items():
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def llm_inputs(grpcclient, url: str, text: str, **sampling):
    """Tensors for the `llm` step itself: what preprocess and vision_encoder produce for ``text``,
    their seals included (called directly, as a client can: llm takes only sealed inputs)."""

    def call(model, values, outputs):
        with grpcclient.InferenceServerClient(url) as client:
            res = client.infer(model, _tensors(grpcclient, values),
                               outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
            return {n: res.as_numpy(n) for n in outputs}

    fields = {"text_input": np.array([[text.encode()]], np.object_), "stream": np.array([[True]]),
              "exclude_input_in_output": np.array([[True]])}
    for key, value in sampling.items():
        fields[key] = np.array([[value]], np.bool_ if isinstance(value, bool) else np.int32)
    pre = call("preprocess", fields, ["input_ids", "pixel_values", "image_grid_thw", "request", "pixel_seal",
                                      "request_seal"])
    vis = call("vision_encoder", {n: pre[n] for n in ("pixel_values", "image_grid_thw", "pixel_seal")},
               ["image_embeds", "image_hashes", "embeds_seal"])
    return _tensors(grpcclient, {**{n: pre[n] for n in ("input_ids", "image_grid_thw", "request", "request_seal")},
                                 **{n: vis[n] for n in ("image_embeds", "image_hashes", "embeds_seal")}})


def test_cancel_stops_generation_within_a_step_and_frees_kv(server, ref):
    """A cancelled stream of the `llm` step itself (its own request: is_cancelled() works there) stops
    within a step or two: the generation-token counter hardly moves after the cancel (3,000 tokens were
    asked), and its KV blocks are freed. Through the public model see tests/server/test_cancel.py."""
    import tritonclient.grpc as grpcclient

    assert wait_for(lambda: metrics(server)["tritonvl_num_requests_running"] == 0)
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), got))
    client.async_stream_infer("llm", llm_inputs(grpcclient, server.grpc_url, "Talk for a long time.",
                                                max_tokens=3000, ignore_eos=True))
    for _ in range(3):
        result, error = got.get(timeout=60)
        assert error is None, error
    assert metrics(server)["tritonvl_kv_cache_usage_ratio"] > 0
    client.stop_stream(cancel_requests=True)
    at_cancel = metrics(server)["tritonvl_generation_tokens_total"]
    client.close()
    assert wait_for(lambda: metrics(server)["tritonvl_num_requests_running"] == 0, timeout=10)
    time.sleep(1.0)  # had it not stopped, a step every few ms would add hundreds of tokens here
    m = metrics(server)
    assert m["tritonvl_generation_tokens_total"] - at_cancel <= 5
    assert m["tritonvl_kv_cache_usage_ratio"] == 0
    assert infer_http(server.http_url, text_input="after cancel", max_tokens=2)["num_output_tokens"] == 2


def test_streamed_text_never_splits_a_utf8_character(server, ref):
    """Deltas join to exactly the full decode: no character is cut in two (which would show as
    U+FFFD in the stream but not in the full text). A random model can also emit byte tokens that
    never form a valid character; those decode to U+FFFD in the full text too, and are allowed."""
    seen_multibyte = False
    for i in range(6):
        responses = stream_grpc(server.grpc_url, text_input=f"用中文回答问题 {i} 🙂", max_tokens=24,
                                temperature=1.0, seed=i, stream=True, exclude_input_in_output=True)
        deltas = [r.get("text_output", "") for r in responses]
        ids = [t for r in responses for t in r.get("output_ids", [])]
        full = ref.tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == full
        assert sum(d.count("\ufffd") for d in deltas) == full.count("\ufffd")
        seen_multibyte |= any(len(ch.encode()) > 1 and ch != "\ufffd" for ch in full)
    assert seen_multibyte, "no multi-byte character was produced: the check saw nothing"


def test_engine_info_metric_names_its_configuration(server):
    """tritonvl_engine_info: the attention backend chosen (auto -> sdpa on CPU) and the KV geometry."""
    import re

    import requests

    text = requests.get(server.metrics_url, timeout=10).text
    m = re.search(r"^tritonvl_engine_info\{([^}]*)\} 1$", text, re.M)
    assert m, text[-2000:]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    assert labels["model"] == "llm" and labels["attention_backend"] == "sdpa" and labels["device"] == "cpu"
    assert labels["block_size"] == "16" and int(labels["num_blocks"]) > 0
    assert int(labels["max_model_len"]) <= int(labels["num_blocks"]) * 16
