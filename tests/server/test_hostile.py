"""A client that reaches Triton's ports cannot change what another request gets (issue 24).

Triton serves the internal models (preprocess, vision_encoder, llm) to every client. Here a client
calls them directly, with forged embeddings under a real image's content key, tokens outside the
vocabulary, wrong row counts, an options JSON asking for 200000 logprobs, and no or wrong seals
(handlers/seals.py), while ordinary streams run: every forged call is INVALID_ARG, the ordinary
streams finish intact and equal transformers' generate(), the same image asked again still gets
generate()'s answer (no poisoned prefix cache), and the server stays ready. A genuine pipeline
replayed by hand (preprocess -> vision_encoder -> llm with the seals they made) and the ensemble
still work: the seals refuse only what the pipeline did not make.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import make_image, stream_grpc, stream_results
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

IMAGE = make_image(160, 120, seed=41)
PROMPT = "What is in the picture?"
MAX = 10


@pytest.fixture(scope="module")
def ref(reference):
    return reference  # the session's generate() on the test model (tests/conftest.py)


@pytest.fixture(scope="module")
def expected(ref):
    return ref.generate(PROMPT, [IMAGE], max_tokens=MAX)


def tensors(values: dict) -> list:
    out = []
    for name, arr in values.items():
        arr = np.asarray(arr)[None]  # the batch dimension
        t = grpcclient.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == np.object_ else
                                  np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def call(url: str, model: str, values: dict, outputs: list[str]) -> dict:
    with grpcclient.InferenceServerClient(url) as client:
        res = client.infer(model, tensors(values), outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
        return {n: res.as_numpy(n)[0] for n in outputs}


def call_llm(url: str, values: dict, timeout: float = 60) -> list[int]:
    """The llm model's token ids for one request (raises the error response)."""
    outs = (r.as_numpy("output_ids") for r in stream_results(url, "llm", tensors(values), timeout))
    return [t for out in outs if out is not None for t in out.reshape(-1).tolist()]


def pipeline(url: str) -> tuple[dict, dict]:
    """preprocess and vision_encoder called by hand, as a client can: their outputs, seals included."""
    pre = call(url, "preprocess", {"text_input": np.array([PROMPT.encode()], np.object_),
                                   "image": np.array([IMAGE], np.object_),
                                   "max_tokens": np.array([MAX], np.int32)},
               ["input_ids", "pixel_values", "image_grid_thw", "request", "pixel_seal", "request_seal"])
    vis = call(url, "vision_encoder", {n: pre[n] for n in ("pixel_values", "image_grid_thw", "pixel_seal")},
               ["image_embeds", "image_hashes", "embeds_seal"])
    return pre, vis


def llm_values(pre: dict, vis: dict, **change) -> dict:
    values = {"input_ids": pre["input_ids"], "image_embeds": vis["image_embeds"],
              "image_grid_thw": pre["image_grid_thw"], "image_hashes": vis["image_hashes"],
              "request": pre["request"], "request_seal": pre["request_seal"],
              "embeds_seal": vis["embeds_seal"]}
    values.update(change)
    return {k: v for k, v in values.items() if v is not None}


def refused(fn, *args, match: str = "") -> str:
    with pytest.raises(InferenceServerException) as info:
        fn(*args)
    text = str(info.value)
    assert "INVALID_ARG" in text or "INVALID_ARGUMENT" in text or "[INVALID_ARG]" in text, text
    assert match in text, text
    return text


def hostile_calls(url: str) -> list[str]:
    """Every forged call a client can make from what the pipeline hands it; each message returned."""
    pre, vis = pipeline(url)
    forged = np.random.default_rng(7).normal(size=vis["image_embeds"].shape).astype(np.float32) * 4
    ids = pre["input_ids"].copy()
    ids[2] = 10**7
    options = json.loads(pre["request"][0])
    options["logprobs"] = 200000
    pixels = pre["pixel_values"].copy()
    pixels[0, 0] += 1.0
    return [
        # the poisoning call: the image's own prompt and content key, forged embeddings
        refused(call_llm, url, llm_values(pre, vis, image_embeds=forged), match="embeds_seal"),
        refused(call_llm, url, llm_values(pre, vis, image_embeds=forged, embeds_seal=None), match="embeds_seal"),
        refused(call_llm, url, llm_values(pre, vis, input_ids=ids), match="request_seal"),
        refused(call_llm, url, llm_values(pre, vis, image_embeds=vis["image_embeds"][:-2]), match="seal"),
        refused(call_llm, url, llm_values(pre, vis, request=np.array([json.dumps(options).encode()], np.object_)),
                match="request_seal"),
        refused(call_llm, url, llm_values(pre, vis, request_seal=None, embeds_seal=None), match="seal"),
        refused(call, url, "vision_encoder", {"pixel_values": pixels, "image_grid_thw": pre["image_grid_thw"],
                                              "pixel_seal": pre["pixel_seal"]}, ["image_embeds"], match="pixel_seal"),
        refused(call, url, "vision_encoder", {"pixel_values": pre["pixel_values"],
                                              "image_grid_thw": pre["image_grid_thw"]}, ["image_embeds"],
                match="pixel_seal: missing"),
    ]


def test_a_replayed_pipeline_works_and_forged_calls_are_refused(server, expected):
    pre, vis = pipeline(server.grpc_url)
    assert call_llm(server.grpc_url, llm_values(pre, vis)) == expected  # the seals pass what the pipeline made
    messages = hostile_calls(server.grpc_url)
    assert len(messages) == 8


def test_ordinary_streams_beside_hostile_calls_finish_intact(server, ref, expected):
    prompts = [f"Story number {i}:" for i in range(3)]
    refs = [ref.generate(p, [IMAGE] if i % 2 else [], max_tokens=24) for i, p in enumerate(prompts)]
    results: dict = {}

    def ordinary(i):
        fields = {"text_input": prompts[i], "max_tokens": 24, "stream": True}
        if i % 2:
            fields["image"] = [IMAGE]
        results[i] = [t for r in stream_grpc(server.grpc_url, **fields) for t in r.get("output_ids", [])]

    threads = [threading.Thread(target=ordinary, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in range(2):
        hostile_calls(server.grpc_url)
    for t in threads:
        t.join(180)
    assert [results.get(i) for i in range(3)] == refs
    # the image the forged calls named still gets generate()'s answer, through both public models
    after = [t for r in stream_grpc(server.grpc_url, text_input=PROMPT, image=[IMAGE], max_tokens=MAX)
             for t in r.get("output_ids", [])]
    assert after == expected
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{server.http_url}/v2/health/ready", timeout=5) as r:
        assert r.status == 200


def test_the_ensemble_carries_the_seals(server, expected):
    import helpers

    old = helpers.MODEL
    helpers.MODEL = "qwen2_5_vl_ensemble"
    try:
        out = stream_grpc(server.grpc_url, text_input=PROMPT, image=[IMAGE], max_tokens=MAX)
    finally:
        helpers.MODEL = old
    assert [t for r in out for t in r.get("output_ids", [])] == expected
