"""Bounds on what one request's JSON and stop lists can make the server do: JSON nesting (messages,
sampling_parameters, structured_outputs, the guide tensors) and stop strings / stop ids, the same rule
on the client (client/rules/sampling.py) and the server (handlers/sampling.py)."""

from __future__ import annotations

import json
import time

import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.sampling import BY_NAME, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from tritonvl.client.rules.structured import (
    MAX_JSON_DEPTH,
    GrammarSpec,
    json_depth,
    load_json,
    parse_guide_tensors,
    parse_structured_outputs,
)
from tritonvl.handlers.preprocess.prompt import parse_messages
from tritonvl.handlers.sampling import build_sampling_params


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def schema_nested(levels: int) -> dict:
    """A schema whose JSON nests ``levels`` deep (each array level adds 1: {"type","items": ...})."""
    schema: dict = {"type": "integer"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


# ---- JSON nesting ----
def test_json_depth_counts_arrays_and_objects():
    assert [json_depth(v) for v in (1, "x", [], {}, [1, [2]], {"a": {"b": [None]}})] == [0, 0, 1, 1, 2, 3]
    assert json_depth(json.loads(nested(500))) == MAX_JSON_DEPTH + 1  # stops counting past the limit
    assert json_depth(schema_nested(MAX_JSON_DEPTH)) == MAX_JSON_DEPTH


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 100_000])
def test_deep_json_is_invalid_arg_naming_the_field(depth):
    text = nested(depth)
    for call, where in [
        (lambda: load_json(text, "x"), "x"),
        (lambda: parse_messages(text, []), "messages"),
        (lambda: build_sampling_params({}, '{"stop": %s}' % text), "sampling_parameters"),
        (lambda: parse_structured_outputs(text), "structured_outputs"),
        (lambda: parse_structured_outputs({"json": text}), "structured_outputs.json"),
        (lambda: parse_guide_tensors(b"json_schema", text.encode()), "guided_decoding_guide"),
    ]:
        start = time.monotonic()
        with pytest.raises(InvalidArgument, match=rf"^{where}: JSON nested too deeply \(more than 64 levels"):
            call()
        assert time.monotonic() - start < 1.0


def test_deep_schemas_given_as_objects_are_refused_too():
    """The gateway and the client pass schemas as dicts: the same bound, without recursion."""
    deep = schema_nested(MAX_JSON_DEPTH)  # 65 levels with the structured_outputs object around it
    with pytest.raises(InvalidArgument, match=r"^structured_outputs: JSON nested too deeply"):
        parse_structured_outputs({"json": deep})
    with pytest.raises(InvalidArgument, match=r"^guided_decoding_guide: JSON nested too deeply"):
        parse_guide_tensors(b"json_schema", json.dumps(schema_nested(MAX_JSON_DEPTH + 1)))
    deep = schema_nested(5000)  # past Python's recursion limit as an object
    with pytest.raises(InvalidArgument, match=r"^structured_outputs: JSON nested too deeply"):
        parse_structured_outputs({"json": deep})
    with pytest.raises(InvalidArgument, match=r"^sampling_parameters: JSON nested too deeply"):
        build_sampling_params({}, json.dumps({"structured_outputs": {"json": schema_nested(MAX_JSON_DEPTH)}}))


def test_json_at_the_limit_is_served():
    assert parse_guide_tensors(b"json_schema", json.dumps(schema_nested(MAX_JSON_DEPTH)).encode()).kind == "json"
    assert parse_structured_outputs({"json": schema_nested(MAX_JSON_DEPTH - 1)}).kind == "json"
    at_limit = schema_nested(MAX_JSON_DEPTH - 2)  # + structured_outputs and json: 64 levels in all
    params = build_sampling_params({}, json.dumps({"structured_outputs": {"json": at_limit}}))
    assert params.structured_outputs["kind"] == "json"
    msgs, _ = parse_messages(json.dumps([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]), [])
    assert msgs[0]["content"][0]["text"] == "hi"


def test_a_deep_spec_that_skipped_preprocess_is_refused_by_the_grammar_step():
    """A spec reaching the llm step some other way (a direct call) gets the same bound."""
    pytest.importorskip("xgrammar")
    from tritonvl.handlers.engine.grammar.xgr import to_grammar

    with pytest.raises(InvalidArgument, match="JSON nested too deeply"):
        to_grammar(GrammarSpec("json", json.dumps(schema_nested(400))))


# ---- stop strings and stop ids ----
def test_the_table_carries_the_stop_bounds():
    assert (BY_NAME["stop"].max_items, BY_NAME["stop"].max_chars) == (MAX_STOP_STRINGS, MAX_STOP_CHARS)
    assert BY_NAME["stop_token_ids"].max_items == MAX_STOP_TOKEN_IDS
    assert (MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS) == (64, 1024, 64)


def test_stops_at_the_limits_are_served():
    stops = [f"s{i}" for i in range(MAX_STOP_STRINGS - 1)] + ["é" * MAX_STOP_CHARS]  # characters, not bytes
    params = build_sampling_params({"stop": [s.encode() for s in stops], "stop_token_ids": list(range(64))}, None)
    assert params.stop == stops and len(params.stop_token_ids) == 64
    params = build_sampling_params({}, json.dumps({"stop": stops, "stop_token_ids": list(range(64))}))
    assert params.stop == stops


@pytest.mark.parametrize("explicit, json_text, words", [
    ({"stop": [b"x"] * 65}, None, "stop_words: 65 strings is over the limit of 64"),
    ({"stop": [b"ok", b"y" * 1025]}, None, "stop_words[1] has 1025 characters, over the limit of 1024"),
    ({"stop_token_ids": list(range(65))}, None, "stop_token_ids: 65 ids is over the limit of 64"),
    ({}, json.dumps({"stop": ["x"] * 100}), "sampling_parameters.stop_words: 100 strings is over the limit of 64"),
    ({}, json.dumps({"stop": "z" * 2000}), "sampling_parameters.stop_words[0] has 2000 characters"),
    ({}, json.dumps({"stop_token_ids": [1] * 65}), "sampling_parameters.stop_token_ids: 65 ids is over"),
], ids=["stop-65", "stop-1025-chars", "stop_token_ids-65", "json-stop-100", "json-stop-2000-chars",
        "json-stop_token_ids-65"])
def test_stops_past_the_limits_are_invalid_arg(explicit, json_text, words):
    with pytest.raises(InvalidArgument) as info:
        build_sampling_params(explicit, json_text)
    assert str(info.value).startswith(words), str(info.value)
    assert len(str(info.value)) < 200  # the list is not echoed back


def test_a_hostile_stop_list_is_refused_at_once():
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match="100000 strings is over the limit of 64"):
        build_sampling_params({"stop": [b"\xff" * 10] * 100_000}, None)  # refused before any entry is decoded
    with pytest.raises(InvalidArgument, match="stop_words\\[0\\] has 1048576 characters"):
        build_sampling_params({"stop": [b"a" * (1 << 20)]}, None)
    assert time.monotonic() - start < 1.0


def test_the_client_applies_the_same_rule():
    from tritonvl.client.errors import InvalidRequest
    from tritonvl.client.params import SamplingParams

    SamplingParams.from_kwargs(stop=["x"] * 64, stop_token_ids=list(range(64)))
    with pytest.raises(InvalidRequest, match="65 strings is over the limit of 64"):
        SamplingParams.from_kwargs(stop=["x"] * 65)
    with pytest.raises(InvalidRequest, match=r"\[0\] has 1025 characters, over the limit of 1024"):
        SamplingParams.from_kwargs(stop="y" * 1025)
    with pytest.raises(InvalidRequest, match="65 ids is over the limit of 64"):
        SamplingParams.from_kwargs(stop_token_ids=list(range(65)))
