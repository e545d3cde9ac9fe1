"""Structured outputs: specs from the interfaces, compiled grammars (cached, off-thread), token masks."""

from tritonvl.handlers.llm.grammar.spec import (
    GrammarSpec,
    check_syntax,
    parse_guide_tensors,
    parse_structured_outputs,
)

__all__ = ["GrammarSpec", "check_syntax", "parse_guide_tensors", "parse_structured_outputs"]
