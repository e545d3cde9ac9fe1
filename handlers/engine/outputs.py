"""What the engine emits: one ``SeqOutput`` record per response of a request.

A streaming request gets a record per text delta, any other exactly one; the last one carries the
finish reason. Records are plain Python (no tensors): the llm model turns them into Triton tensors
(``handlers/llm/tensors.py``), the offline pipeline reads them as they are, and the response pump
merges consecutive ones of a request (``SeqOutput.merged``). vLLM's engine core emits records the same
way (``EngineCoreOutputs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tritonvl.handlers.options import RequestOptions


@dataclass
class SeqOutput:
    """New tokens since the request's previous record, their text and logprob entries; usage so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # one entry per token of token_ids when the request asked for logprobs (engine/logprobs.py), else None
    logprobs: list[dict] | None = None
    finish_reason: str | None = None  # set on the last record only
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_visual_tokens: int = 0  # placeholder tokens of the images and videos (vision_encoder rows)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merged(self, newer: SeqOutput) -> SeqOutput:
        """This record followed by ``newer`` as one: text, ids and logprobs joined; usage and the finish
        reason are ``newer``'s (they are cumulative / final)."""
        logprobs = None if self.logprobs is None and newer.logprobs is None else \
            (self.logprobs or []) + (newer.logprobs or [])
        return SeqOutput(self.text + newer.text, self.token_ids + newer.token_ids, logprobs,
                         newer.finish_reason or self.finish_reason, newer.num_input_tokens,
                         newer.num_output_tokens, newer.num_visual_tokens)


Emit = Callable[[SeqOutput], None]


class Responder:
    """Collects one request's progress and emits its records: one per text delta when streaming, else
    one at the end (with the prompt's text in front unless ``exclude_input_in_output``)."""

    def __init__(self, options: RequestOptions, num_input_tokens: int, emit: Emit,
                 emit_error: Callable[[Exception], None], num_visual_tokens: int = 0) -> None:
        self.stream = options.stream
        self.prefix = "" if options.exclude_input_in_output or options.stream else options.prompt_text
        self.n_in = num_input_tokens
        self.n_visual = num_visual_tokens
        self.n_out = 0
        self.emit = emit
        self.emit_error = emit_error
        self.want_logprobs = options.logprobs >= 0
        self.stream_interval = 1  # a streaming delta every this many tokens (llm parameter stream_interval)
        self._held = 0  # tokens since the last record
        self._sent = False  # a record went out (the first token goes out at once)
        self._text: list[str] = []
        self._ids: list[int] = []
        self._logprobs: list[dict] = []
        self.done = False

    def delta(self, text: str, ids: list[int], logprobs: list[dict] = ()) -> None:
        """New tokens (and the text they released, possibly ''; their logprob entries when asked)."""
        self.n_out += len(ids)
        self._held += len(ids)
        self._text.append(text)
        self._ids.extend(ids)
        self._logprobs.extend(logprobs)
        if self.stream and (not self._sent or self._held >= self.stream_interval) and "".join(self._text):
            self._flush(None)

    def finish(self, reason: str, text: str = "", ids: list[int] | None = None, logprobs: list[dict] = ()) -> None:
        """The last record (the response with the FINAL flag). Called exactly once."""
        if self.done:
            return
        if text or ids:
            self.n_out += len(ids or [])
            self._text.append(text)
            self._ids.extend(ids or [])
        self._logprobs.extend(logprobs)
        self.done = True
        self._flush(reason)

    def fail(self, exc: Exception) -> None:
        """End the request with an error instead (the final response). Nothing after it."""
        if not self.done:
            self.done = True
            self.emit_error(exc)

    def _flush(self, reason: str | None) -> None:
        text = "".join(self._text)
        if reason is not None and not self.stream:
            text = self.prefix + text
        self.emit(SeqOutput(text, self._ids, self._logprobs if self.want_logprobs else None, reason,
                            self.n_in, self.n_out, self.n_visual))
        self._text, self._ids, self._logprobs = [], [], []
        self._held, self._sent = 0, True
