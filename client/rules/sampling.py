"""The sampling parameters' rules (vLLM's ranges) and their messages: one table that the client checks
before sending and the server (``handlers/sampling.py``) checks on arrival. No torch, no numpy."""

from __future__ import annotations

import math
from typing import Any, Callable

# Numbers that must be finite (nan/inf) before any range applies.
FINITE = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

# name -> (is the value allowed, the rule as errors state it: "<name>=<value>: <rule>")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v == 1, "only n=1 is supported"),
    "max_tokens": (lambda v: v >= 1, "must be at least 1"),
    "min_tokens": (lambda v: v >= 0, "must be between 0 and max_tokens"),
    "temperature": (lambda v: v >= 0, "must be >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= -1, "must be -1 or 0 (off) or a positive integer"),
    "min_p": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "must be > 0"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    "seed": (lambda v: 0 <= v < 2**64, "must be in [0, 2**64)"),
}

EMPTY_STOP = "empty strings are not allowed"

_KINDS = {bool: "a boolean", int: "an integer", float: "a number"}

# Keys of the `sampling_parameters` JSON whose value may also be written as a string, as vLLM's Triton
# backend converts them (its samples/client.py sends "temperature": "0.1", "max_tokens": "100").
# Unlike its bool("false") (true), "false" is false here; other words are refused.
FROM_STRING: dict[str, type] = {
    "temperature": float, "top_p": float, "presence_penalty": float, "frequency_penalty": float,
    "max_tokens": int, "min_tokens": int, "top_k": int, "n": int,
    "ignore_eos": bool, "skip_special_tokens": bool,
}
_WORDS = {"true": True, "false": False, "1": True, "0": False}


def from_string(name: str, value):
    """A JSON string value of a FROM_STRING key as that key's type ("0.1" -> 0.1, "100" -> 100,
    "false" -> False); any other value comes back unchanged (the type check then judges it)."""
    kind = FROM_STRING.get(name)
    if kind is None or not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if kind is bool:
            return _WORDS[text.lower()]
        number = float(text)
        return int(number) if kind is int and number.is_integer() else number
    except (KeyError, ValueError):
        return value


def range_error(name: str, value) -> str | None:
    """The rule ``value`` breaks as field ``name``, or None (also for None: the field is unset)."""
    if value is None:
        return None
    if name in FINITE and not math.isfinite(value):
        return "must be a finite number"
    allowed, rule = RANGES.get(name, (None, ""))
    return rule if allowed is not None and not allowed(value) else None


def min_tokens_error(min_tokens: int, max_tokens: int) -> str | None:
    """min_tokens against max_tokens, once both are known."""
    return None if 0 <= min_tokens <= max_tokens else f"must be between 0 and max_tokens ({max_tokens})"


def type_error(kind: type, value) -> str | None:
    """Whether ``value`` is of ``kind`` (bool, int or float); bool is not a number here."""
    ok = (isinstance(value, bool) if kind is bool
          else not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float)))
    return None if ok else f"expected {_KINDS[kind]}, got {value!r}"
