"""Structured outputs in the engine itself (OfflinePipeline: the server's preprocess + engine in one
process): the matcher lives with the sequence, so preemption by recompute and prefix-cache hits give
exactly the answers a roomy cache gives."""

from __future__ import annotations

import json

import pytest

from tritonvl.handlers.preprocess.preprocessor import RawRequest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {
    "caption": {"type": "string", "maxLength": 12},
    "objects": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}},
    "required": ["caption", "objects"]}


def requests_(n: int) -> list[RawRequest]:
    so = json.dumps({"structured_outputs": {"json": SCHEMA}}).encode()
    return [RawRequest(text_input=f"Caption {i % 2}.".encode(), sampling_parameters=so, exclude_input_in_output=True,
                       sampling={"max_tokens": 300, "temperature": 1.0, "seed": i}) for i in range(n)]


def run(model_dir, kv_cache_bytes: int, passes: int = 1, n: int = 8):
    """``passes`` rounds of the same requests through one engine (later rounds hit the prefix cache)."""
    from tritonvl.handlers.tools.offline import OfflinePipeline

    with OfflinePipeline(str(model_dir), kv_cache_bytes=kv_cache_bytes, block_size=16, max_num_seqs=8) as pipe:
        results = [pipe.generate(requests_(n), timeout=600) for _ in range(passes)]
        stats = (pipe.engine.scheduler.num_preemptions, pipe.engine.blocks.prefix_hits_tokens)
    return results, stats


def test_preemption_and_prefix_cache_keep_the_grammar_in_step(model_dir):
    (roomy, again), (roomy_preempted, hits) = run(model_dir, 64 << 20, passes=2)
    # KV for 16 blocks of 16 tokens: 8 sequences of ~20 prompt + up to ~100 answer tokens cannot all fit
    kv_per_token = 2 * 3 * 2 * 16 * 4  # K and V x layers x kv heads x head_dim x fp32 (tests/conftest sizes)
    (tight,), (preempted, _) = run(model_dir, 16 * 16 * kv_per_token)
    assert roomy_preempted == 0 and preempted > 0 and hits > 0
    for a, b, c in zip(roomy, tight, again):
        assert not a.error and not b.error and not c.error, (a.error, b.error, c.error)
        assert a.finish_reason == b.finish_reason == c.finish_reason == "stop"
        assert a.token_ids == b.token_ids == c.token_ids  # same seed: the same answer, preempted or cached
        jsonschema.validate(json.loads(a.text), SCHEMA)
