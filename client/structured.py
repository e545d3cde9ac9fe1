"""Structured outputs on the client side (no torch): the shape of vLLM's ``structured_outputs`` object
and OpenAI's ``response_format`` mapped onto it. The server (``handlers/llm/grammar/spec.py``) uses the
same table and then checks the schema / regex / grammar itself."""

from __future__ import annotations

from typing import Any

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
