"""Structured outputs on xgrammar: a GrammarSpec (``tritonvl.client.rules.structured``) as a Grammar.

``check_syntax`` parses the grammar without a tokenizer (milliseconds), so preprocess can refuse a bad
schema, regex or grammar with INVALID_ARG naming it before the request reaches the llm step.
"""

from __future__ import annotations

import re

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.structured import KINDS, GrammarSpec
from tritonvl.handlers.engine.grammar.jsonstrings import safe_schema

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
            # compact separators: the answer has no free whitespace to wander in; strings rewritten
            # around xgrammar's string bugs (jsonstrings.py)
            return xgr.Grammar.from_json_schema(safe_schema(spec.text), any_whitespace=False)
        if spec.kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_value":
            return xgr.Grammar.builtin_json_grammar()
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.text)
        if spec.kind == "grammar":
            return xgr.Grammar.from_ebnf(spec.text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"structured output {label}: {exc}") from None
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
