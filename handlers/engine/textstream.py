"""Per-sequence text: incremental detokenization and stop strings.

Shared by every llm backend. Whether a token ends the sequence by id or length is decided once, in
``engine.sequence.token_ending`` (the scheduler's post-step applies it; generate() too), and passed
in with the token: a stop id ends with "stop" and its text is not shown, max_tokens with "length".
Stop strings are decided here: they end with "stop" and are cut from the text. Before min_tokens no
stop applies (the sampler also masks stop ids then).
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tritonvl.client.rules.stops import StopStringMatcher
from tritonvl.handlers.sampling import SamplingParams


class IncrementalDetokenizer:
    """Decode token by token without ever emitting half of a UTF-8 character; ``flush`` at the end.

    tokenizers' ``DecodeStream`` does the per-token work (one decode of a short window per token, in
    Rust); it holds text back while it ends in a partial character. We track the same window
    (``_prefix``: start of the context, ``_read``: end of what was emitted) only for ``flush``.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self._backend = tokenizer.backend_tokenizer  # the tokenizers.Tokenizer of a fast HF tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._stream.step(self._backend, token_id)
        if text is None:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text

    def flush(self) -> str:
        """The text held back at the end (a partial character shows as U+FFFD, as a full decode gives it)."""
        if self._read == len(self.ids):
            return ""
        window = self.ids[self._prefix:]
        before = self.tokenizer.decode(window[:self._read - self._prefix], skip_special_tokens=self.skip)
        after = self.tokenizer.decode(window, skip_special_tokens=self.skip)
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


class OutputStream:
    """Feed sampled tokens; read text deltas, ids and the finish reason."""

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, ending: str | None = None) -> str:
        """Book one token and its ``ending`` (``token_ending``: "stop" for a stop id, "length", or None);
        return the text delta that may be shown now."""
        self.ids.append(token_id)
        if ending == "stop":  # a stop id: its text is not shown
            self.finish_reason = "stop"
            return self._tail()
        delta = self.detok.add(token_id)
        if len(self.ids) > self.params.min_tokens or not self.params.stop:
            delta = self.matcher.feed(delta)
            if self.matcher.stopped is not None:
                self.finish_reason = "stop"
                return delta
        if ending is not None:
            delta += self._tail()
            self.finish_reason = "stop" if self.matcher.stopped is not None else "length"
        return delta

    def _tail(self) -> str:
        """At the end: the detokenizer's held-back text (through the stop matcher when stops apply),
        then what the matcher held back."""
        held = self.detok.flush()
        if len(self.ids) > self.params.min_tokens or not self.params.stop:
            held = self.matcher.feed(held)
        return held + self.matcher.flush()

    def end(self, reason: str = "stop") -> str:
        """End here (a structured output's grammar is complete): the held-back text, then done."""
        tail = self._tail()
        self.finish_reason = reason
        return tail

    def cancel(self, reason: str = "cancelled") -> str:
        self.finish_reason = reason
        return ""
