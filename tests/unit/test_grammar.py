"""Structured outputs without a server: spec parsing, the compile cache, and the batched token mask
(xgrammar with Qwen's real tokenizer and the model's padded vocabulary)."""

from __future__ import annotations

import json
import re
import time

import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.structured import GrammarSpec, parse_guide_tensors, parse_structured_outputs
from tritonvl.handlers.engine.grammar.xgr import check_syntax

pytest.importorskip("xgrammar")
torch = pytest.importorskip("torch")

VOCAB = 151936  # Qwen2.5-VL's logits width (the tokenizer has fewer tokens)
SCHEMA = {"type": "object", "properties": {"caption": {"type": "string", "maxLength": 12},
                                           "scene": {"enum": ["indoor", "outdoor"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["caption", "scene", "n"]}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tritonvl.handlers.tiny_model import tokenizer_source_dir

    return AutoTokenizer.from_pretrained(str(tokenizer_source_dir()))


@pytest.fixture(scope="module")
def cache(tok):
    from tritonvl.handlers.engine.grammar.compiler import GrammarCache

    c = GrammarCache(tok, VOCAB, workers=1)
    yield c
    c.close()


# ---- specs ----
def test_each_structured_outputs_key_becomes_one_spec():
    assert parse_structured_outputs({"json": SCHEMA}).kind == "json"
    as_text = parse_structured_outputs({"json": json.dumps(SCHEMA, indent=2)})
    assert as_text == parse_structured_outputs({"json": SCHEMA})  # one cache key, whatever the spacing
    assert parse_structured_outputs({"regex": r"\d+"}) == GrammarSpec("regex", r"\d+")
    assert parse_structured_outputs({"grammar": 'root ::= "a"'}).kind == "grammar"
    assert parse_structured_outputs({"json_object": True}) == GrammarSpec("json_object")
    assert parse_structured_outputs(json.dumps({"choice": ["a", "b"]})).kind == "grammar"
    assert parse_structured_outputs(None) is None and parse_structured_outputs({}) is None


def test_trtllm_guide_tensors():
    assert parse_guide_tensors(b"json", None) == GrammarSpec("json_value")
    assert parse_guide_tensors(b"json_schema", json.dumps(SCHEMA).encode()).kind == "json"
    assert parse_guide_tensors(b"regex", b"[a-z]+") == GrammarSpec("regex", "[a-z]+")
    assert parse_guide_tensors(b"ebnf_grammar", b'root ::= "x"').kind == "grammar"
    assert parse_guide_tensors(None, None) is None and parse_guide_tensors(b"none", None) is None


@pytest.mark.parametrize("value, words", [
    ({"json": SCHEMA, "regex": "a"}, "exactly one"),
    ({"jsn": {}}, "unknown key"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1, 2]}, "must be an object"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 3]}, "choice[1]"),
    ({"json_object": "yes"}, "expected true"),
    ("[1]", "expected an object"),
])
def test_bad_structured_outputs_name_the_problem(value, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        parse_structured_outputs(value)


@pytest.mark.parametrize("guide_type, guide, words", [
    (b"xml", b"x", "expected one of"),
    (b"regex", None, "required"),
    (None, b"\\d+", "without guided_decoding_guide_type"),
    (b"json_schema", b"{", "not valid JSON"),
])
def test_bad_guide_tensors_name_the_problem(guide_type, guide, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        parse_guide_tensors(guide_type, guide)


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec("json", '{"type":"foo"}'), 'json schema: Unsupported type "foo"'),
    (GrammarSpec("json", '{"$ref":"#/defs/x"}'), "Cannot find field defs"),
    (GrammarSpec("regex", "(ab"), "regex: Regex parsing error at position"),
    (GrammarSpec("regex", "(?<=a)b"), "Lookbehind is not supported"),
    (GrammarSpec("grammar", "root ::= foo"), 'Rule "foo" is not defined'),
    (GrammarSpec("grammar", 'rot ::= "a"'), 'root rule with name "root" is not found'),
])
def test_syntax_check_names_the_problem_without_a_tokenizer(spec, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        check_syntax(spec)


# ---- the cache ----
def test_one_compile_per_distinct_spec(cache):
    spec = parse_structured_outputs({"regex": r"(yes|no)[0-9]{2}"})
    before = (cache.stats.hits, cache.stats.misses)
    entries = [cache.get(spec) for _ in range(5)]
    compiled = {id(e.future.result(timeout=60)) for e in entries}
    assert len(compiled) == 1
    assert (cache.stats.hits - before[0], cache.stats.misses - before[1]) == (4, 1)


def test_lru_keeps_the_bytes_bounded(tok):
    from tritonvl.handlers.engine.grammar.compiler import GrammarCache

    small = GrammarCache(tok, VOCAB, max_bytes=1, workers=1)
    try:
        for pattern in ("a+", "b+", "c+"):
            small.get(GrammarSpec("regex", pattern)).future.result(timeout=60)
        assert len(small) == 1 and small.stats.evictions == 2
        small.get(GrammarSpec("regex", "c+")).future.result(timeout=60)  # the newest stayed: a hit
        assert small.stats.hits == 1
    finally:
        small.close()


def test_slow_compile_times_out_and_the_queue_keeps_moving(tok):
    """A pattern that compiles for seconds fails its request (INVALID_ARG) at the time limit, and a
    fresh worker compiles the next spec at once instead of queueing behind it."""
    from tritonvl.handlers.engine.grammar.compiler import CompileWaitlist, GrammarCache

    one = GrammarCache(tok, VOCAB, workers=1)
    one.wait_ready(120)
    wait = CompileWaitlist(one, timeout_s=0.3)
    try:
        wait.add("slow", GrammarSpec("json", json.dumps({"type": "string", "maxLength": 40})))
        time.sleep(0.1)  # the slow one is running on the only worker
        wait.add("quick", GrammarSpec("regex", "[0-9]"))
        ready, failed, deadline = [], [], time.monotonic() + 60
        while len(ready) + len(failed) < 2 and time.monotonic() < deadline:
            r, f = wait.poll()
            ready += r
            failed += f
            time.sleep(0.02)
        assert [item for item, _ in ready] == ["quick"]
        assert [item for item, _ in failed] == ["slow"]
        assert isinstance(failed[0][1], InvalidArgument) and "grammar_compile_timeout_s" in str(failed[0][1])
        assert one.stats.timeouts == 1
    finally:
        one.close()


def test_compile_error_is_invalid_argument_and_not_cached(cache):
    entry = cache.get(GrammarSpec("regex", "(ab"))
    with pytest.raises(InvalidArgument, match="Regex parsing error"):
        entry.future.result(timeout=60)
    assert GrammarSpec("regex", "(ab") not in cache._entries


# ---- matchers and the batched mask ----
def _decode_constrained(tok, cache, spec: GrammarSpec, eos: int, steps: int = 80, seed: int = 0) -> tuple[str, bool]:
    """Random logits, masked, argmax: returns the text and whether it ended with eos."""
    from tritonvl.handlers.engine.grammar.matcher import GrammarMasker, SeqGrammar

    g = SeqGrammar(cache.get(spec).future.result(timeout=120), [eos])
    masker = GrammarMasker(VOCAB)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(3, VOCAB, generator=gen)
        raw = logits.clone()
        logits = masker.apply(logits, [1], [g])
        assert torch.equal(logits[0], raw[0]) and torch.equal(logits[2], raw[2])  # other rows untouched
        token = int(logits[1].argmax())
        assert g.accept(token)
        if token == eos:
            assert g.terminated
            return tok.decode(out), True
        out.append(token)
    return tok.decode(out), False


def test_masked_decoding_follows_a_schema(tok, cache):
    import jsonschema

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for seed in range(3):
        text, ended = _decode_constrained(tok, cache, parse_structured_outputs({"json": SCHEMA}), eos, seed=seed)
        assert ended, text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_masked_decoding_follows_a_regex_and_a_choice(tok, cache):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    text, ended = _decode_constrained(tok, cache, GrammarSpec("regex", r"[A-Z]{2}-\d{3}"), eos)
    assert ended and re.fullmatch(r"[A-Z]{2}-\d{3}", text), text
    choices = ['say "hi"', "back\\slash", "naïve"]
    text, ended = _decode_constrained(tok, cache, parse_structured_outputs({"choice": choices}), eos)
    assert ended and text in choices, text


def test_mask_on_a_transposed_view(tok, cache):
    """The runner's CPU logits can be a transposed view (W @ h.T).T: the mask must land on the right rows."""
    from tritonvl.handlers.engine.grammar.matcher import GrammarMasker, SeqGrammar

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    g = SeqGrammar(cache.get(GrammarSpec("regex", "[0-9]")).future.result(timeout=60), [eos])
    raw = torch.randn(VOCAB, 4, generator=torch.Generator().manual_seed(1)).T  # [4, VOCAB], stride (1, 4)
    logits = raw.clone().T.contiguous().T
    assert logits.stride(-1) != 1
    logits = GrammarMasker(VOCAB).apply(logits, [2], [g])
    allowed = torch.isfinite(logits[2]).nonzero().flatten().tolist()
    assert sorted(tok.decode([t]) for t in allowed) == [str(d) for d in range(10)]
    for row in (0, 1, 3):
        assert torch.equal(logits[row], raw[row])


def test_end_token_only_when_the_grammar_accepts(tok, cache):
    from tritonvl.handlers.engine.grammar.matcher import GrammarMasker, SeqGrammar

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    g = SeqGrammar(cache.get(GrammarSpec("regex", "ab")).future.result(timeout=60), [eos])
    masker = GrammarMasker(VOCAB)
    logits = torch.zeros(1, VOCAB)
    masker.apply(logits, [0], [g])
    assert logits[0, eos] == -float("inf") and not g.completed
    for t in tok.encode("ab"):
        assert g.accept(t)
    logits = torch.zeros(1, VOCAB)
    masker.apply(logits, [0], [g])
    assert g.completed and torch.isfinite(logits[0]).nonzero().flatten().tolist() == [eos]
    assert logits[0, len(tok):].eq(-float("inf")).all()  # padded vocabulary never allowed


# ---- the client's side: response_format and the structured_outputs option ----
def test_response_format_maps_onto_structured_outputs():
    from tritonvl.client.rules.structured import from_response_format

    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == {"json_object": True}
    rf = {"type": "json_schema", "json_schema": {"name": "caption", "schema": SCHEMA, "strict": True}}
    assert parse_structured_outputs(from_response_format(rf)) == parse_structured_outputs({"json": SCHEMA})
    with pytest.raises(ValueError, match="json_schema.schema: required"):
        from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(ValueError, match="expected 'text', 'json_object' or 'json_schema'"):
        from_response_format({"type": "xml"})


def test_client_sends_structured_outputs_in_sampling_parameters():
    from tritonvl.client.errors import InvalidRequest
    from tritonvl.client.params import SamplingParams

    p = SamplingParams.from_kwargs(max_tokens=50, structured_outputs={"json": SCHEMA})
    sent = json.loads(p.tensors()["sampling_parameters"][0])
    assert parse_structured_outputs(sent["structured_outputs"]) == parse_structured_outputs({"json": SCHEMA})
    with pytest.raises(InvalidRequest, match="exactly one of"):
        SamplingParams.from_kwargs(structured_outputs={"regex": "a", "choice": ["b"]})
