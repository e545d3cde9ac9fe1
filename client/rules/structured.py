"""What a request asks the answer to look like, parsed the same way by client, gateway and server (no
torch): vLLM's ``structured_outputs`` object (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``), TensorRT-LLM's tensor pair ``guided_decoding_guide_type`` / ``guided_decoding_guide``
(``json``, ``json_schema``, ``regex``, ``ebnf_grammar``) and OpenAI's ``response_format`` (mapped onto
``structured_outputs``) all become one ``GrammarSpec``. The server then checks the schema / regex /
grammar itself with xgrammar (``handlers/engine/grammar/xgr.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tritonvl.client.rules.errors import InvalidArgument

# vLLM's keys: exactly one per request
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def structured_error(value: Any) -> str | None:
    """What is wrong with the shape of a ``structured_outputs`` object, or None."""
    if not isinstance(value, dict):
        return f"expected an object with one of {list(STRUCTURED_KEYS)}"
    unknown = sorted(set(value) - set(STRUCTURED_KEYS))
    if unknown:
        return f"unknown key(s) {unknown}; known: {list(STRUCTURED_KEYS)}"
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) > 1:
        return f"give exactly one of {list(STRUCTURED_KEYS)}, got {given}"
    return None


def from_response_format(response_format: Any) -> dict | None:
    """OpenAI's ``response_format`` -> a ``structured_outputs`` object (None for ``{"type": "text"}``).

    ``{"type": "json_object"}`` -> ``{"json_object": True}``;
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` -> ``{"json": {...}}``.
    Raises ValueError naming the problem.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("response_format: expected an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise ValueError("response_format.json_schema.schema: required (a JSON schema object)")
        return {"json": spec["schema"]}
    raise ValueError(f"response_format.type={kind!r}: expected 'text', 'json_object' or 'json_schema'")


# Internal kinds. "json" is a JSON schema (canonical JSON text); "json_object" any JSON object;
# "json_value" any JSON value (TensorRT-LLM's guide type "json"); "grammar" is EBNF (choices become one).
KINDS = ("json", "json_object", "json_value", "regex", "grammar")
# TensorRT-LLM guide types -> our kinds.
GUIDE_TYPES = {"json": "json_value", "json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar"}
MAX_SPEC_CHARS = 256 * 1024  # a schema past this is refused before parsing
# Arrays and objects nested in one JSON input (messages, sampling_parameters, a schema or a
# structured_outputs object given as text): past it, INVALID_ARG. Python's json gives up near 1000
# levels with a RecursionError, and xgrammar's schema conversion time grows steeply with depth (a
# schema nested 900 levels held preprocess for a minute); real schemas nest a dozen levels.
MAX_JSON_DEPTH = 64


def json_depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar: 0, ``[]``: 1), counted
    without recursion; the count stops once it passes ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return deepest


def too_deep(where: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays and "
                           "objects)")


def check_json_depth(value, where: str):
    """``value`` itself; InvalidArgument naming ``where`` when it nests past MAX_JSON_DEPTH."""
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep(where)
    return value


def load_json(text: str, where: str, what: str = "not valid JSON"):
    """``json.loads`` with the depth bound: InvalidArgument ``<where>: <what> (<reason>)`` or ``<where>: JSON
    nested too deeply ...``, never a RecursionError."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep(where) from None
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {what} ({exc})") from None
    return check_json_depth(value, where)


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
        value = load_json(_string(value, where), where, "the schema is not valid JSON")
    else:
        check_json_depth(value, where)
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
        value = load_json(_string(value, where), where)
    else:
        check_json_depth(value, where)
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
