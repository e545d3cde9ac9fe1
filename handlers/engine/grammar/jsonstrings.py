"""JSON schemas rewritten around xgrammar's string bugs, before they become grammars (``xgr.to_grammar``).

xgrammar 0.2.8 (the newest release; json_schema_converter.cc ``GenerateString``) builds a schema
string in one of three ways, and answers that end with ``stop`` can break the schema or JSON itself:

- ``minLength``/``maxLength`` without ``pattern``: `"` + {min,max} characters of ``[^"\\\\\\r\\n]`` + `"`.
  Raw control characters other than CR/LF (tab, \\x01, ...) pass, so the answer is not JSON (a strict
  parser refuses them; no escape is allowed either).
- ``pattern``: a regex automaton over the string's body that excludes `"`, `\\` and the control
  characters (its ``json_string=true`` mode): right, but ``minLength``/``maxLength`` beside it are
  dropped, and a pattern holding a character outside printable ASCII, one the automaton cannot build,
  or one that needs an excluded character (``^a\\tb$``) falls back to a plain expansion that writes
  raw characters.
- a ``format`` it knows (date, email, uuid, ...): its own regex; ``pattern`` and the lengths beside it
  are dropped.

Without ``"type": "string"`` (no type at all) it drops ``pattern`` and the lengths too (any JSON value).

``safe_schema`` rewrites a schema so that none of this can happen: a length-bounded string becomes
the pattern ``^[^"\\\\\\x00-\\x1f]{min,max}$`` (one unescaped JSON character per schema character, so
the count is the schema's; xgrammar's pattern mode never writes escapes, as it did not with the
lengths either); a pattern beside lengths is kept when it already implies them, tightened when it is
one repeated character class (``^[a-z]+$`` with maxLength 8 -> ``^[a-z]{1,8}$``), and refused
otherwise; every pattern is written in printable ASCII (``\\uXXXX``) and must stay in xgrammar's
``json_string`` mode (checked on a one-property schema); a known format with a pattern or lengths is
refused; an untyped schema with string keywords gets every type listed (xgrammar then applies them
to the string branch). Refusals are INVALID_ARG naming the schema location. Answers stay a subset of
what the schema allows, so every one that ends with ``stop`` is strict JSON that validates.
"""

from __future__ import annotations

import functools
import json
import re

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.structured import check_json_depth, too_deep

BODY_CHAR = r'[^"\\\x00-\x1f]'  # one character a JSON string holds unescaped
ALL_TYPES = ["string", "number", "boolean", "null", "array", "object"]
# where a schema holds subschemas: one, a list of them, a name -> subschema map
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("prefixItems", "items", "anyOf", "oneOf", "allOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# a pattern that is one repeated atom (a class, an escape, any character or a plain one) and its quantifier
_ATOM = r"\[(?:\\.|[^\]\\])*\]|\\u[0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2}|\\.|[^\\()\[\]{}|*+?^$]"
_REPEATED = re.compile(rf"\^?(?P<atom>{_ATOM})(?P<q>[*+?]|\{{\d+\}}|\{{\d+,\d*\}})\$?", re.S)


def safe_schema(text: str) -> str:
    """The schema's JSON text with every string xgrammar would get wrong rewritten (the same text when
    nothing needs it). Raises InvalidArgument for what cannot be generated right."""
    try:
        schema = json.loads(text)
    except ValueError:
        return text  # xgrammar names the problem
    except RecursionError:
        raise too_deep("the schema") from None
    check_json_depth(schema, "the schema")  # also for specs that did not come through preprocess
    fixed = _walk(schema, "#", False)
    return text if fixed == schema else json.dumps(fixed, separators=(",", ":"), ensure_ascii=False)


def _walk(node, at: str, names: bool):
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = _walk(out[key], f"{at}/{key}", key == "propertyNames")
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [_walk(s, f"{at}/{key}/{i}", False) for i, s in enumerate(out[key])]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {k: _walk(s, f"{at}/{key}/{k}", False) for k, s in out[key].items()}
    return _string(out, at, names)


def _string(node: dict, at: str, names: bool) -> dict:
    """One schema's string keywords, made safe. ``names``: it is a propertyNames schema (always a string)."""
    lengths = "minLength" in node or "maxLength" in node
    pattern = node.get("pattern")
    if (not lengths and pattern is None) or "enum" in node or "const" in node:
        return node  # xgrammar writes enum/const values itself, escaped
    types = node.get("type")
    types = [types] if isinstance(types, str) else types
    if types is not None and (not isinstance(types, list) or "string" not in types):
        return node  # string keywords on a non-string: nothing to generate
    if pattern is not None and not isinstance(pattern, str):
        return node  # xgrammar refuses it
    lo, hi = _bounds(node, at)
    fmt = node.get("format")
    if isinstance(fmt, str) and _known_format(fmt):
        given = [k for k in ("pattern", "minLength", "maxLength") if k in node]
        raise InvalidArgument(f"{at}: format {fmt!r} with {' and '.join(given)} is not supported (xgrammar "
                              "generates the format and would ignore them); give one or the other")
    if pattern is None:
        pattern = f"^{BODY_CHAR}{{{lo},{'' if hi is None else hi}}}$"
    elif lengths:
        pattern = _within(pattern, lo, hi, at)
    pattern = _printable(pattern)
    if not _json_string_mode(pattern):
        raise InvalidArgument(
            f"{at}/pattern: {pattern!r} cannot be generated as JSON string text: xgrammar would write raw "
            "characters (the pattern needs a quote, a backslash or a control character, or uses a feature "
            "its regex automaton lacks)")
    out = {k: v for k, v in node.items() if k not in ("minLength", "maxLength")}
    out["pattern"] = pattern
    if types is None and not names:
        out["type"] = ALL_TYPES
    return out


def _bounds(node: dict, at: str) -> tuple[int, int | None]:
    for key in ("minLength", "maxLength"):
        value = node.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{at}/{key}: expected a non-negative integer, got {value!r}")
    lo, hi = node.get("minLength", 0), node.get("maxLength")
    if hi is not None and lo > hi:
        raise InvalidArgument(f"{at}: minLength {lo} is over maxLength {hi}: no string fits")
    return lo, hi


def _parsed(pattern: str):
    """Python's parse of a regex (JSON Schema's ECMA dialect agrees on the simple ones), or None."""
    try:
        from re import _parser
    except ImportError:  # Python < 3.11
        import sre_parse as _parser
    try:
        return _parser.parse(pattern)
    except Exception:
        return None


def _within(pattern: str, lo: int, hi: int | None, at: str) -> str:
    """A pattern whose full matches (xgrammar matches patterns whole) also have lo..hi characters."""
    parsed = _parsed(pattern)
    if parsed is not None:
        fewest, most = parsed.getwidth()
        if fewest >= lo and (hi is None or most <= hi):
            return pattern  # the pattern implies the lengths
    m = _REPEATED.fullmatch(pattern)
    atom = _parsed(m["atom"]) if m else None
    if atom is not None and atom.getwidth() == (1, 1):
        q = m["q"]
        q_lo, q_hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}.get(q) or _counts(q)
        highs = [x for x in (hi, q_hi) if x is not None]
        new_lo, new_hi = max(lo, q_lo), min(highs) if highs else None
        if new_hi is not None and new_lo > new_hi:
            raise InvalidArgument(f"{at}: no string matches pattern {pattern!r} with {lo}..{hi} characters")
        return f"^{m['atom']}{{{new_lo},{'' if new_hi is None else new_hi}}}$"
    raise InvalidArgument(
        f"{at}: pattern {pattern!r} with minLength/maxLength is not supported: xgrammar ignores the lengths "
        "beside a pattern; put them in the pattern (e.g. ^[a-z]{1,8}$)")


def _counts(q: str) -> tuple[int, int | None]:
    """'{3}' -> (3, 3), '{2,}' -> (2, None), '{2,5}' -> (2, 5)."""
    low, comma, high = q[1:-1].partition(",")
    return int(low), (int(high) if high else None) if comma else int(low)


def _printable(pattern: str) -> str:
    """Characters outside printable ASCII as regex escapes (xgrammar's automaton reads only those)."""
    out: list[str] = []
    escaped = False  # the previous character is an unescaped backslash
    for ch in pattern:
        if " " <= ch <= "~":
            out.append(ch)
            escaped = ch == "\\" and not escaped
            continue
        if escaped:  # an escaped literal: the escape below stands for it
            out.pop()
            escaped = False
        code = ord(ch)
        out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\u{{{code:x}}}")
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _json_string_mode(pattern: str) -> bool:
    """Whether xgrammar keeps the pattern in its json_string automaton (no raw `"`, `\\` or controls)."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(json.dumps({"type": "string", "pattern": pattern}),
                                               any_whitespace=False)
    except Exception:
        return True  # a bad pattern: the real schema's conversion names it
    return "json_string=true" in str(grammar)


@functools.lru_cache(maxsize=64)
def _known_format(fmt: str) -> bool:
    """Whether xgrammar generates this format itself (then it drops pattern and lengths): the format
    wins over a pattern exactly then."""
    import xgrammar as xgr

    def text(schema: dict) -> str:
        return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))

    try:
        return text({"type": "string", "format": fmt, "pattern": "^z$"}) != text({"type": "string", "pattern": "^z$"})
    except Exception:
        return False
