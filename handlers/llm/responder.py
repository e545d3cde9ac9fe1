"""Turn a sequence's progress into responses: one per text delta when streaming, else exactly one."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tritonvl.handlers.options import RequestOptions

# send(outputs, final): outputs maps public output names to numpy arrays (no batch dim).
Send = Callable[[dict, bool], None]


def outputs(text: str, ids: list[int], n_in: int, n_out: int, finish_reason: str | None, n_img: int = 0,
            logprobs: list[str] | None = None) -> dict:
    out = {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.asarray(ids, dtype=np.int32),
        "num_input_tokens": np.array([n_in], dtype=np.uint32),
        "num_output_tokens": np.array([n_out], dtype=np.uint32),
        "num_image_tokens": np.array([n_img], dtype=np.uint32),
    }
    if finish_reason is not None:
        out["finish_reason"] = np.array([finish_reason.encode()], dtype=np.object_)
    if logprobs is not None:  # one JSON object per token of output_ids (llm/logprobs.py)
        out["logprobs"] = np.array([e.encode() for e in logprobs], dtype=np.object_)
    return out


class Responder:
    def __init__(self, options: RequestOptions, num_input_tokens: int, send: Send,
                 send_error: Callable[[Exception], None], num_image_tokens: int = 0) -> None:
        self.stream = options.stream
        self.prefix = "" if options.exclude_input_in_output or options.stream else options.prompt_text
        self.n_in = num_input_tokens
        self.n_img = num_image_tokens
        self.n_out = 0
        self.send = send
        self.send_error = send_error
        self._text: list[str] = []
        self._ids: list[int] = []
        self.logprobs = options.logprobs >= 0
        self._logprobs: list[str] = []
        self.done = False

    def delta(self, text: str, ids: list[int], logprobs: list[str] = ()) -> None:
        """New tokens (and the text they released, possibly ''; their logprob entries when asked)."""
        self.n_out += len(ids)
        self._text.append(text)
        self._ids.extend(ids)
        self._logprobs.extend(logprobs)
        if self.stream and "".join(self._text):
            self._flush(None, final=False)

    def finish(self, reason: str, text: str = "", ids: list[int] | None = None, logprobs: list[str] = ()) -> None:
        """The last response, carrying the FINAL flag. Called exactly once."""
        if self.done:
            return
        if text or ids:
            self.n_out += len(ids or [])
            self._text.append(text)
            self._ids.extend(ids or [])
        self._logprobs.extend(logprobs)
        self.done = True
        self._flush(reason, final=True)

    def fail(self, exc: Exception) -> None:
        """End the request with an error response instead (FINAL). Nothing after it."""
        if not self.done:
            self.done = True
            self.send_error(exc)

    def _flush(self, reason: str | None, final: bool) -> None:
        text = "".join(self._text)
        if final and not self.stream:
            text = self.prefix + text
        self.send(outputs(text, self._ids, self.n_in, self.n_out, reason, self.n_img,
                          self._logprobs if self.logprobs else None), final)
        self._text, self._ids, self._logprobs = [], [], []
