"""Per-sequence output bookkeeping: incremental detokenization and stop decisions.

Shared by every llm backend so that the text, the ids and the finish reason follow one set of
rules: eos (from generation_config, unless ignore_eos) and stop_token_ids end with "stop" and the
stop token's text is not shown; stop strings end with "stop" and are cut from the text; max_tokens
ends with "length". Before min_tokens no stop applies (the sampler also masks stop ids then).
"""

from __future__ import annotations

from tritonvl.client.stops import StopStringMatcher
from tritonvl.handlers.sampling import SamplingParams


class IncrementalDetokenizer:
    """Decode token by token without ever emitting half of a UTF-8 character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of what has already been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip)
        after = decode(self.ids[self._prefix:], skip_special_tokens=self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""


class OutputStream:
    """Feed sampled tokens; read text deltas, ids and the finish reason."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: tuple[int, ...] | list[int]) -> None:
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int) -> str:
        """Book one token; return the text delta that may be shown now."""
        self.ids.append(token_id)
        n = len(self.ids)
        if n > self.params.min_tokens and token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self.matcher.flush()
        delta = self.detok.add(token_id)
        if n > self.params.min_tokens or not self.params.stop:
            delta = self.matcher.feed(delta)
            if self.matcher.stopped is not None:
                self.finish_reason = "stop"
                return delta
        if n >= self.params.max_tokens:
            self.finish_reason = "length"
            return delta + self.matcher.flush()
        return delta

    def cancel(self, reason: str = "cancelled") -> str:
        self.finish_reason = reason
        return ""
