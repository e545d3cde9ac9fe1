"""What a request asks the answer to look like: one ``GrammarSpec`` from any of the interfaces.

Sources: vLLM's ``structured_outputs`` object (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``), TensorRT-LLM's tensor pair ``guided_decoding_guide_type`` / ``guided_decoding_guide``
(``json``, ``json_schema``, ``regex``, ``ebnf_grammar``), and OpenAI's ``response_format`` (the
gateway maps it onto ``structured_outputs``). ``check_syntax`` parses the grammar without a tokenizer
(milliseconds), so preprocess can refuse a bad schema, regex or grammar with INVALID_ARG naming it
before the request reaches the llm step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tritonvl.client.structured import STRUCTURED_KEYS, structured_error
from tritonvl.handlers.errors import InvalidArgument

# Internal kinds. "json" is a JSON schema (canonical JSON text); "json_object" any JSON object;
# "json_value" any JSON value (TensorRT-LLM's guide type "json"); "grammar" is EBNF (choices become one).
KINDS = ("json", "json_object", "json_value", "regex", "grammar")
# TensorRT-LLM guide types -> our kinds.
GUIDE_TYPES = {"json": "json_value", "json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar"}
MAX_SPEC_CHARS = 256 * 1024  # a schema past this is refused before parsing


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint; ``(kind, text)`` is also the compile-cache key."""

    kind: str
    text: str = ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text}

    @classmethod
    def from_dict(cls, value: dict | None) -> GrammarSpec | None:
        return None if value is None else cls(value["kind"], value.get("text", ""))


def _string(value, where: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_SPEC_CHARS:
        raise InvalidArgument(f"{where}: {len(value)} characters is over the limit ({MAX_SPEC_CHARS})")
    return value


def _schema_text(value, where: str) -> str:
    """A JSON schema given as an object or as JSON text -> compact canonical text (key order kept:
    it is the order the answer's properties are generated in)."""
    if isinstance(value, (str, bytes)):
        text = _string(value, where)
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"{where}: the schema is not valid JSON ({exc})") from None
    if not isinstance(value, (dict, bool)):
        raise InvalidArgument(f"{where}: a JSON schema must be an object (or true/false), got {type(value).__name__}")
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidArgument(f"{where}: {len(text)} characters is over the limit ({MAX_SPEC_CHARS})")
    return text


def choice_grammar(choices, where: str) -> str:
    """EBNF whose only sentences are the given strings."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise InvalidArgument(f"{where}: expected a non-empty list of strings")
    items = [_string(c, f"{where}[{i}]") for i, c in enumerate(choices)]
    # JSON string literals are valid EBNF literals (same escapes: \" \\ \n \uXXXX)
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=True) for c in items)


def parse_structured_outputs(value, where: str = "structured_outputs") -> GrammarSpec | None:
    """vLLM's ``structured_outputs`` object (a dict, or its JSON text) -> GrammarSpec; None when empty."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(_string(value, where))
        except ValueError as exc:
            raise InvalidArgument(f"{where}: not valid JSON ({exc})") from None
    problem = structured_error(value)
    if problem:
        raise InvalidArgument(f"{where}: {problem}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if not given:
        return None
    key, item = given[0], value[given[0]]
    at = f"{where}.{key}"
    if key == "json":
        return GrammarSpec("json", _schema_text(item, at))
    if key == "json_object":
        if item is not True:
            raise InvalidArgument(f"{at}: expected true")
        return GrammarSpec("json_object")
    if key == "choice":
        return GrammarSpec("grammar", choice_grammar(item, at))
    return GrammarSpec(key, _string(item, at))


def parse_guide_tensors(guide_type, guide, where: str = "guided_decoding_guide_type") -> GrammarSpec | None:
    """TensorRT-LLM's pair of tensors -> GrammarSpec; None when no guide type is given."""
    if guide_type is None:
        if guide not in (None, b"", ""):
            raise InvalidArgument("guided_decoding_guide: given without guided_decoding_guide_type")
        return None
    kind_name = _string(guide_type, where).strip().lower()
    if kind_name in ("", "none"):
        return None
    if kind_name not in GUIDE_TYPES:
        raise InvalidArgument(f"{where}={kind_name!r}: expected one of {sorted(GUIDE_TYPES)}")
    kind = GUIDE_TYPES[kind_name]
    if kind == "json_value":
        return GrammarSpec("json_value")
    if guide in (None, b"", ""):
        raise InvalidArgument(f"guided_decoding_guide: required for guided_decoding_guide_type={kind_name!r}")
    if kind == "json":
        return GrammarSpec("json", _schema_text(guide, "guided_decoding_guide"))
    return GrammarSpec(kind, _string(guide, "guided_decoding_guide"))


_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def xgrammar_message(exc: Exception) -> str:
    """xgrammar's error text without its '[time] file.cc:line:' prefix."""
    return _XGR_PREFIX.sub("", str(exc).strip()).splitlines()[0] if str(exc).strip() else type(exc).__name__


def to_grammar(spec: GrammarSpec):
    """The xgrammar Grammar of a spec (no tokenizer needed). Raises InvalidArgument naming the problem."""
    import xgrammar as xgr

    label = {"json": "json schema", "regex": "regex", "grammar": "grammar"}.get(spec.kind, spec.kind)
    try:
        if spec.kind == "json":
            # compact separators: the answer has no free whitespace to wander in
            return xgr.Grammar.from_json_schema(spec.text, any_whitespace=False)
        if spec.kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_value":
            return xgr.Grammar.builtin_json_grammar()
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.text)
        if spec.kind == "grammar":
            return xgr.Grammar.from_ebnf(spec.text)
    except RecursionError:
        raise InvalidArgument(f"structured output {label}: nested too deeply") from None
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's reason
        raise InvalidArgument(f"structured output {label}: {xgrammar_message(exc)}") from None
    raise InvalidArgument(f"structured output: unknown kind {spec.kind!r}; known: {list(KINDS)}")


def check_syntax(spec: GrammarSpec | None) -> GrammarSpec | None:
    """Parse the spec's grammar once (fast, no tokenizer): a bad schema/regex/grammar is INVALID_ARG."""
    if spec is not None:
        to_grammar(spec)
    return spec
