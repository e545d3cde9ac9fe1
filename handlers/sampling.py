"""Sampling parameters: one typed object, validated with vLLM's ranges.

Sources, in increasing priority: the model's generation_config defaults, the vLLM-style
``sampling_parameters`` JSON, then the explicit tensors of the public interface.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from .errors import InvalidArgument

# Keys accepted in the `sampling_parameters` JSON (vLLM names) and the field each one sets.
JSON_KEYS = {
    "max_tokens": "max_tokens",
    "min_tokens": "min_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
    "stop_words": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "skip_special_tokens": "skip_special_tokens",
    "n": "n",
}


@dataclass
class SamplingParams:
    max_tokens: int = 256
    min_tokens: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SamplingParams:
        return cls(**json.loads(text))

    def validate(self, vocab_size: int) -> SamplingParams:
        """Raise InvalidArgument naming the field and the rule; return self."""

        def bad(name: str, rule: str) -> InvalidArgument:
            return InvalidArgument(f"{name}={getattr(self, name)!r}: {rule}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if self.n != 1:
            raise bad("n", "only n=1 is supported")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be between 0 and max_tokens ({self.max_tokens})")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 or 0 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise bad("seed", "must be in [0, 2**64)")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidArgument(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})")
        for s in self.stop:
            if not s:
                raise InvalidArgument("stop_words: empty strings are not allowed")
        return self


def _coerce(name: str, value, kind):
    """Type-check one value from JSON or a tensor; bool is not an int here."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise InvalidArgument(f"{name}: expected a boolean, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InvalidArgument(f"{name}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{name}: expected a number, got {value!r}")
        return float(value)
    return value


_KINDS = {f.name: f.type for f in fields(SamplingParams)}
_SCALAR = {"int": int, "float": float, "bool": bool, "int | None": int}


def build_sampling_params(
    explicit: dict,
    json_text: str | None,
    defaults: dict | None = None,
    vocab_size: int = 151936,
) -> SamplingParams:
    """Merge defaults < ``sampling_parameters`` JSON < explicit tensors, then validate.

    ``explicit`` maps field names (``stop`` for stop_words) to Python values already read
    from tensors; None values are ignored.
    """
    values: dict = dict(defaults or {})
    if json_text:
        try:
            parsed = json.loads(json_text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"sampling_parameters: not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise InvalidArgument("sampling_parameters: expected a JSON object")
        unknown = sorted(set(parsed) - set(JSON_KEYS))
        if unknown:
            raise InvalidArgument(f"sampling_parameters: unknown key(s) {unknown}; known: {sorted(JSON_KEYS)}")
        for key, value in parsed.items():
            if value is not None:
                values[JSON_KEYS[key]] = value
    values.update({k: v for k, v in explicit.items() if v is not None})
    out = {}
    for name, value in values.items():
        kind = _SCALAR.get(str(_KINDS[name]))
        if kind is not None:
            out[name] = _coerce(name, value, kind)
        elif name == "stop":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                raise InvalidArgument("stop_words: expected a string or a list of strings")
            out[name] = list(items)
        elif name == "stop_token_ids":
            if not isinstance(value, list):
                raise InvalidArgument("stop_token_ids: expected a list of integers")
            out[name] = [_coerce("stop_token_ids", v, int) for v in value]
    if out.get("top_k") == -1:
        out["top_k"] = 0
    return SamplingParams(**out).validate(vocab_size)


def defaults_from_generation_config(gen: dict) -> dict:
    """The model's own defaults (what generate() would use), when it samples by default."""
    if not gen.get("do_sample", False):
        return {"temperature": 0.0, **({"repetition_penalty": gen["repetition_penalty"]}
                                        if "repetition_penalty" in gen else {})}
    out = {}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if key in gen:
            out[key] = gen[key]
    return out
