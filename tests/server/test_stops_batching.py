"""Stops, lengths, and real dynamic batching of the vision encoder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests
from helpers import Reference, infer_http, joined, make_image, stream_grpc

PROMPT = "Write a long answer about the sea."


def baseline(server, n=16):
    return infer_http(server.http_url, text_input=PROMPT, max_tokens=n, temperature=0.0,
                      exclude_input_in_output=True, ignore_eos=True)


def test_max_tokens_ends_with_length(server):
    out = baseline(server, 5)
    assert out["finish_reason"] == "length" and out["num_output_tokens"] == 5


def test_stop_token_ids_end_with_stop(server):
    ids = baseline(server)["output_ids"]
    stop_at = 4
    out = infer_http(server.http_url, text_input=PROMPT, max_tokens=16, temperature=0.0,
                     exclude_input_in_output=True, stop_token_ids=[ids[stop_at]])
    first = ids.index(ids[stop_at])
    assert out["finish_reason"] == "stop"
    assert out["output_ids"] == ids[: first + 1]  # the stop token is in the ids...
    full = baseline(server)["text_output"]
    assert full.startswith(out["text_output"])  # ...but its text is not shown


def test_stop_words_end_with_stop_and_are_not_leaked(server):
    full = baseline(server)
    text = full["text_output"]
    # a stop string taken from the middle of the real output, spanning two tokens when possible
    start = len(text) // 3
    stop = text[start:start + 3]
    for fields in ({}, {"stream": True}):
        if fields:
            out = joined(stream_grpc(server.grpc_url, text_input=PROMPT, max_tokens=16, temperature=0.0,
                                     exclude_input_in_output=True, stop_words=[stop], **fields))
        else:
            out = infer_http(server.http_url, text_input=PROMPT, max_tokens=16, temperature=0.0,
                             exclude_input_in_output=True, stop_words=[stop])
        assert out["finish_reason"] == "stop"
        assert stop not in out["text_output"]
        assert out["text_output"] == text[: text.index(stop)]


def test_vision_encoder_batches_under_concurrency(server, model_dir):
    url = f"http://{server.http_url}/v2/models/vision_encoder/stats"
    before = requests.get(url, timeout=10).json()["model_stats"][0]
    images = [make_image(80 + 28 * (i % 4), 100 + 14 * (i % 3), seed=100 + i) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda img: infer_http(server.http_url, text_input="Batch me.", image=[img],
                                                    max_tokens=4, temperature=0.0,
                                                    exclude_input_in_output=True), images))
    after = requests.get(url, timeout=10).json()["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == len(images)
    assert executions < inferences, f"{executions} executions for {inferences} inferences: no batching"
    ref = Reference(str(model_dir))
    for img, out in zip(images, outs):
        assert out["output_ids"] == ref.generate("Batch me.", [img], max_tokens=4)
