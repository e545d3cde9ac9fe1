"""Stop-token-aware output parsing: the client's safety net for servers that ignore stops.

The server already stops on eos, stop ids and stop strings. A server or model repository that
does not (or a model whose eos differs) would leak ``<|im_end|>`` and run on to max_tokens; the
parser cuts the text at the first stop across chunk boundaries, never shows part of a stop string
while streaming, strips special tokens, truncates the ids after a stop id and reports "stop".
Before ``min_tokens`` output tokens no stop applies (the server's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import SamplingParams
from .rules.stops import StopStringMatcher

QWEN_EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
END_MARKERS = ("<|im_end|>", "<|endoftext|>")
SPECIAL_TOKENS = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                  "<|video_pad|>")


@dataclass(frozen=True)
class StopRules:
    """The model-specific part: eos ids, end-of-turn strings, special tokens to delete.

    For another model, e.g. InternVL: ``StopRules(eos_token_ids=(0, 92543, 92542),
    end_markers=("<|im_end|>", "</s>"))``.
    """

    eos_token_ids: tuple[int, ...] = QWEN_EOS_IDS
    end_markers: tuple[str, ...] = END_MARKERS
    strip_tokens: tuple[str, ...] = SPECIAL_TOKENS


class OutputParser:
    """Feed each response's (text delta, ids); read safe text, the kept ids and the finish reason."""

    def __init__(self, params: SamplingParams | None = None, rules: StopRules = StopRules()) -> None:
        params = params or SamplingParams()
        self.rules = rules
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(rules.eos_token_ids))
        self.min_tokens = params.min_tokens or 0
        self.include_stop = bool(params.include_stop_str_in_output)
        self._main = StopStringMatcher([*params.stop, *rules.end_markers], self.include_stop, rules.strip_tokens)
        # before min_tokens: nothing stops; end markers are deleted like other special tokens
        self._early = StopStringMatcher((), False, [*rules.strip_tokens, *rules.end_markers])
        self.ids: list[int] = []
        self.count = 0  # output tokens seen, stop id included
        self.stop: str | int | None = None  # what the parser stopped at

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    def feed(self, text: str, ids: list[int] | None = None) -> str:
        """Book one response; return the text that may be shown now ('' once stopped)."""
        if self.stopped:
            return ""
        ids = list(ids or [])
        cut = None
        for k, token in enumerate(ids):
            self.count += 1
            if self.count > self.min_tokens and token in self.stop_ids:
                cut = k
                break
        self.ids.extend(ids if cut is None else ids[: cut + 1])
        if self.min_tokens and ids and self.count <= self.min_tokens:
            return self._early.feed(text)
        out = self._main.feed(self._early.flush() + text)
        if self._main.stopped is not None and self.include_stop and self._main.stopped in self.rules.end_markers:
            out = out[: len(out) - len(self._main.stopped)]
        if cut is not None:
            # the id's own text, if the server decoded it, is an end marker or a stripped token
            out += self._main.flush()
            self.stop = ids[cut]
        elif self._main.stopped is not None:
            self.stop = self._main.stopped
        return out

    def flush(self) -> str:
        """At the end of the response stream: what was held back."""
        if self.stopped:
            return ""
        return self._early.flush() + self._main.flush()  # at most one of them holds text

    def finish_reason(self, server_reason: str | None) -> str | None:
        """"stop" when the parser stopped the text, else what the server said."""
        return "stop" if self.stopped else server_reason
