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


# ---- strict JSON, always: 200 answers over length-bounded strings, enums, arrays and nested objects ----
# (xgrammar 0.2.8 lets raw control characters into minLength/maxLength strings; the random tiny model
# finds them: handlers/engine/grammar/jsonstrings.py rewrites those strings, docs/STRUCTURED.md)
STRICT_SCHEMAS = {
    "caption": {"type": "object", "properties": {  # SGLang's captioning example, smaller
        "caption": {"type": "string", "maxLength": 24},
        "scene": {"type": "string", "enum": ["indoor", "outdoor"]},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
        "required": ["caption", "scene", "objects"]},
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
        "required": ["name", "age", "tags"]},
    "order": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 5},
        "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "minLength": 1, "maxLength": 6},
            "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}},
        "note": {"type": ["string", "null"], "maxLength": 6}},
        "required": ["id", "lines", "note"]},
    "words": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 5},
              "minItems": 1, "maxItems": 4},
    "ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/short"}, "b": {"$ref": "#/$defs/short"}},
            "required": ["a", "b"], "$defs": {"short": {"type": "string", "minLength": 1, "maxLength": 7}}},
}
STRICT_MAX_TOKENS = 200  # above what the longest answer takes on this model (a character can be 4 byte tokens)


def strict_requests() -> list[tuple[str, float, RawRequest]]:
    out = []
    for name, schema in STRICT_SCHEMAS.items():
        so = json.dumps({"structured_outputs": {"json": schema}}).encode()
        for i in range(40):
            temperature = 0.0 if i < 20 else 1.0  # greedy over 20 prompts, then 20 seeds
            prompt = f"Fill in the {name} #{i}: tabs\t, quotes \" and \\ welcome."
            out.append((name, temperature, RawRequest(
                text_input=prompt.encode(), sampling_parameters=so, exclude_input_in_output=True,
                sampling={"max_tokens": STRICT_MAX_TOKENS, "temperature": temperature, "seed": i})))
    return out


def test_200_constrained_answers_are_strict_json_and_valid(model_dir):
    from tritonvl.handlers.tools.offline import OfflinePipeline

    jobs = strict_requests()
    assert len(jobs) == 200
    with OfflinePipeline(str(model_dir), kv_cache_bytes=256 << 20, max_num_seqs=64,
                         grammar_compile_timeout_s=300) as pipe:
        results = pipe.generate([r for _, _, r in jobs], timeout=900)
    counts: dict[tuple[str, str], int] = {}
    not_json, not_valid = [], []
    for (name, temperature, _), res in zip(jobs, results):
        assert not res.error, (name, res.error)
        key = (name, res.finish_reason)
        counts[key] = counts.get(key, 0) + 1
        if res.finish_reason != "stop":  # ended by the grammar (the requests give no stop strings)
            continue
        try:
            value = json.loads(res.text, strict=True)  # raw control characters in a string fail here
        except ValueError as exc:
            not_json.append((name, temperature, res.text, str(exc)))
            continue
        try:
            jsonschema.validate(value, STRICT_SCHEMAS[name])
        except jsonschema.ValidationError as exc:
            not_valid.append((name, temperature, res.text, exc.message))
    stops = sum(n for (_, reason), n in counts.items() if reason == "stop")
    print(f"\n200 constrained answers: {stops} ended with stop, {200 - stops} with length; "
          f"{len(not_json)} of the stop ones not strict JSON, {len(not_valid)} not schema-valid; "
          f"by schema: {sorted(counts.items())}")
    assert not not_json and not not_valid, (not_json[:3], not_valid[:3])
    assert stops >= 190, counts  # max_tokens is generous: a cut answer is the rare exception
    for name in STRICT_SCHEMAS:
        for temperature in (0.0, 1.0):
            texts = {res.text for (n, t, _), res in zip(jobs, results) if n == name and t == temperature}
            assert len(texts) > 1, (name, temperature)  # different prompts / seeds, different answers
