"""xgrammar 0.2.8's string bugs and our schema rewrite (handlers/engine/grammar/jsonstrings.py), without a
tokenizer: what the grammar of a schema accepts, judged against a strict JSON parser and jsonschema."""

from __future__ import annotations

import itertools
import json

import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.structured import GrammarSpec
from tritonvl.handlers.engine.grammar.jsonstrings import safe_schema
from tritonvl.handlers.engine.grammar.xgr import to_grammar

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
from xgrammar.testing import _is_grammar_accept_string as accepts  # noqa: E402

ISSUE = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10}}, "required": ["a"]}


def grammar(schema: dict):
    return to_grammar(GrammarSpec("json", json.dumps(schema, separators=(",", ":"))))


def valid(schema: dict, text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text, strict=True), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_xgrammar_still_has_the_string_length_bug():
    """The upstream bug, as filed (docs/STRUCTURED.md). When this fails, xgrammar fixed it: the rewrite
    of length-bounded strings can go (keep the other checks of jsonstrings.py until they are fixed too)."""
    raw = xgr.Grammar.from_json_schema(json.dumps(ISSUE), any_whitespace=False)
    assert accepts(raw, '{"a": "x\ty"}') and accepts(raw, '{"a": "x\x01y"}')
    without = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    assert not accepts(xgr.Grammar.from_json_schema(json.dumps(without), any_whitespace=False), '{"a": "x\ty"}')


def test_length_bounded_strings_refuse_raw_control_characters():
    """The regression test: fails on xgrammar 0.2.8 without the rewrite."""
    g = grammar(ISSUE)
    for bad in ('{"a": "x\ty"}', '{"a": "x\x01y"}', '{"a": "\x1f"}', '{"a": "01234567890"}'):
        assert not accepts(g, bad), repr(bad)
    for good in ('{"a": "xy"}', '{"a": ""}', '{"a": "0123456789"}', '{"a": "é€😀"}'):
        assert accepts(g, good), repr(good)


# what xgrammar may write inside a string: raw controls, escapes, quotes, multi-byte characters
PIECES = ["a", "\t", "\x01", "\n", "\\n", "\\t", "\\u0041", '\\"', "\\\\", '"', "é", "😀", " "]
CANDIDATES = ["".join(p) for n in range(5) for p in itertools.product(PIECES[:7], repeat=n) if n < 4] + \
    ["".join(p) for p in itertools.product(PIECES, repeat=2)]

SCHEMAS = [
    {"type": "string", "maxLength": 3},
    {"type": "string", "minLength": 2, "maxLength": 3},
    {"type": "string", "minLength": 1},
    {"type": ["string", "null"], "maxLength": 2},
    {"maxLength": 2},
    {"type": "string", "pattern": "^[a-z]+$", "maxLength": 2},
    {"type": "string", "pattern": "^.*$"},
    {"type": "string", "pattern": "^[^b]{0,3}$"},
    {"type": "string", "pattern": "^é*$"},
    {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}]},
]


@pytest.mark.parametrize("sub", SCHEMAS, ids=[json.dumps(s) for s in SCHEMAS])
def test_every_accepted_string_is_strict_json_and_valid(sub):
    schema = {"type": "object", "properties": {"a": sub}, "required": ["a"]}
    g = grammar(schema)
    accepted = 0
    for body in CANDIDATES:
        text = '{"a": "' + body + '"}'
        if accepts(g, text):
            accepted += 1
            assert valid(schema, text), repr(text)
    assert accepted >= 2  # not vacuous


@pytest.mark.parametrize("where", ["properties", "items", "prefixItems", "anyOf", "oneOf", "allOf", "$defs",
                                   "additionalProperties", "patternProperties", "propertyNames"])
def test_strings_are_rewritten_wherever_a_schema_holds_one(where):
    s = {"type": "string", "maxLength": 3}
    schema, bad = {
        "properties": ({"type": "object", "properties": {"k": s}, "required": ["k"]}, '{"k": "a\tb"}'),
        "items": ({"type": "array", "items": s}, '["a\tb"]'),
        "prefixItems": ({"type": "array", "prefixItems": [s], "items": False}, '["a\tb"]'),
        "anyOf": ({"anyOf": [s, {"type": "integer"}]}, '"a\tb"'),
        "oneOf": ({"oneOf": [s, {"type": "integer"}]}, '"a\tb"'),
        "allOf": ({"allOf": [s]}, '"a\tb"'),
        "$defs": ({"$ref": "#/$defs/s", "$defs": {"s": s}}, '"a\tb"'),
        "additionalProperties": ({"type": "object", "additionalProperties": s}, '{"k": "a\tb"}'),
        "patternProperties": ({"type": "object", "patternProperties": {"^k$": s}}, '{"k": "a\tb"}'),
        "propertyNames": ({"type": "object", "propertyNames": {"maxLength": 3},
                           "additionalProperties": {"type": "integer"}}, '{"a\tb": 1}'),
    }[where]
    assert accepts(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False), bad)  # the bug
    assert not accepts(grammar(schema), bad)
    assert "maxLength" not in safe_schema(json.dumps(schema))


def test_pattern_and_lengths_together():
    # xgrammar drops the lengths beside a pattern: kept when the pattern implies them ...
    same = {"type": "string", "pattern": "^[0-9]{4}$", "minLength": 4, "maxLength": 4}
    assert json.loads(safe_schema(json.dumps(same))) == {"type": "string", "pattern": "^[0-9]{4}$"}
    # ... tightened when the pattern is one repeated character class ...
    rewritten = json.loads(safe_schema(json.dumps({"type": "string", "pattern": "^[a-z]+$", "maxLength": 8})))
    assert rewritten["pattern"] == "^[a-z]{1,8}$"
    rewritten = json.loads(safe_schema(json.dumps({"type": "string", "pattern": "\\d{2,}", "minLength": 3})))
    assert rewritten["pattern"] == "^\\d{3,}$"
    # ... and refused otherwise, naming the place
    with pytest.raises(InvalidArgument, match=r"#/properties/a: pattern '\^\(ab\)\+\$' with minLength/maxLength"):
        grammar({"type": "object", "properties": {"a": {"type": "string", "pattern": "^(ab)+$", "maxLength": 4}}})
    with pytest.raises(InvalidArgument, match="no string matches"):
        grammar({"type": "string", "pattern": "^[a-z]{5,9}$", "maxLength": 4})


@pytest.mark.parametrize("sub, words", [
    ({"type": "string", "pattern": "^a\\tb$"}, "cannot be generated as JSON string text"),
    ({"type": "string", "pattern": '^a"b$'}, "cannot be generated as JSON string text"),
    ({"type": "string", "format": "date", "maxLength": 10}, "format 'date' with maxLength is not supported"),
    ({"type": "string", "format": "email", "pattern": "^a"}, "format 'email' with pattern"),
    ({"type": "string", "minLength": 5, "maxLength": 3}, "no string fits"),
    ({"type": "string", "maxLength": -1}, "maxLength: expected a non-negative integer"),
    ({"type": "string", "maxLength": True}, "maxLength: expected a non-negative integer"),
])
def test_what_cannot_be_generated_right_is_invalid_arg(sub, words):
    with pytest.raises(InvalidArgument, match=words):
        grammar({"type": "object", "properties": {"a": sub}})


def test_what_needs_no_rewrite_is_left_alone():
    for schema in ({"type": "string"}, {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
                   {"type": "integer", "maxLength": 3}, {"enum": ["a\tb"], "maxLength": 3},
                   {"type": "string", "format": "date"}, {"type": "string", "format": "my-own"}):
        text = json.dumps(schema)
        assert safe_schema(text) is text
    # an unknown format is no format to xgrammar: the lengths still become a pattern
    rewritten = json.loads(safe_schema(json.dumps({"type": "string", "format": "my-own", "maxLength": 3})))
    assert rewritten["format"] == "my-own" and rewritten["pattern"].endswith("{0,3}$")


def test_patterns_are_written_in_printable_ascii():
    """xgrammar keeps a pattern in its JSON-string automaton only when it is printable ASCII; otherwise it
    writes the pattern's characters raw (a tab in the pattern: a raw tab in the answer)."""
    rewritten = json.loads(safe_schema(json.dumps({"type": "string", "pattern": "^[é\\😀]+$"})))
    assert rewritten["pattern"] == "^[\\u00e9\\u{1f600}]+$"
    g = grammar({"type": "string", "pattern": "^[é😀 ]+$"})
    assert accepts(g, '"é😀"') and not accepts(g, '"a"')
    with pytest.raises(InvalidArgument, match="cannot be generated"):
        grammar({"type": "string", "pattern": "^a\tb$"})  # a raw tab in the pattern: only a raw tab matches
