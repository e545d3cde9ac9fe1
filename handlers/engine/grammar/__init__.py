"""Structured outputs on the engine: xgrammar grammars from specs, compiled (cached, off-thread), token masks."""
