"""Sampling parameters as one typed object, checked with the server's rules before anything is sent."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

from .errors import InvalidRequest

# Fields sent as their own tensor (and JSON key on HTTP); the rest travel in `sampling_parameters`.
TENSOR_TYPES = {
    "max_tokens": "INT32",
    "min_tokens": "INT32",
    "temperature": "FP32",
    "top_p": "FP32",
    "top_k": "INT32",
    "repetition_penalty": "FP32",
    "presence_penalty": "FP32",
    "frequency_penalty": "FP32",
    "seed": "UINT64",
    "ignore_eos": "BOOL",
}
JSON_ONLY = ("min_p", "include_stop_str_in_output", "skip_special_tokens")


@dataclass
class SamplingParams:
    """What to generate. ``None`` leaves a field to the server's default (greedy, 256 tokens).

    The same ranges as the server (vLLM's): ``validate()`` raises ``InvalidRequest`` naming the
    field and the rule, so a mistake fails before the request is sent.
    """

    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 = off
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kwargs) -> SamplingParams:
        """``base`` (or defaults) updated with keyword arguments; unknown names are a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base else {}
        values.update(kwargs)
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        values["stop"] = list(values.get("stop") or [])
        values["stop_token_ids"] = list(values.get("stop_token_ids") or [])
        return cls(**values).validate()

    def validate(self) -> SamplingParams:
        """Raise InvalidRequest naming the field and the rule; return self."""
        self._check_types()

        def check(name: str, ok, rule: str) -> None:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise InvalidRequest(f"{name}={value!r}: {rule}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            check(name, math.isfinite, "must be a finite number")
        check("max_tokens", lambda v: v >= 1, "must be at least 1")
        if self.max_tokens is not None:
            check("min_tokens", lambda v: 0 <= v <= self.max_tokens,
                  f"must be between 0 and max_tokens ({self.max_tokens})")
        check("min_tokens", lambda v: v >= 0, "must be >= 0")
        check("temperature", lambda v: v >= 0, "must be >= 0")
        check("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
        check("top_k", lambda v: v >= -1, "must be -1 or 0 (off) or a positive integer")
        check("min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        check("repetition_penalty", lambda v: v > 0, "must be > 0")
        check("presence_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        check("frequency_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        check("seed", lambda v: 0 <= v < 2**64, "must be in [0, 2**64)")
        for t in self.stop_token_ids:
            if t < 0 or t >= 2**31:
                raise InvalidRequest(f"stop_token_ids: {t} is not a token id")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop: empty strings are not allowed")
        return self

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("stop", "stop_token_ids"):
                continue
            kind = str(f.type).split(" |")[0]
            if kind == "bool" and not isinstance(value, bool):
                raise InvalidRequest(f"{f.name}: expected a boolean, got {value!r}")
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidRequest(f"{f.name}: expected an integer, got {value!r}")
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidRequest(f"{f.name}: expected a number, got {value!r}")
                setattr(self, f.name, float(value))
        if not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequest("stop: expected a list of strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids: expected a list of integers")

    def tensors(self) -> dict[str, tuple[object, str]]:
        """Explicit tensors to send: name -> (value, Triton datatype); unset fields left out."""
        out: dict[str, tuple[object, str]] = {
            name: (getattr(self, name), dtype) for name, dtype in TENSOR_TYPES.items() if getattr(self, name) is not None}
        if self.stop:
            out["stop_words"] = (list(self.stop), "BYTES")
        if self.stop_token_ids:
            out["stop_token_ids"] = (list(self.stop_token_ids), "INT32")
        extra = self.json_only()
        if extra:
            out["sampling_parameters"] = (json.dumps(extra), "BYTES")
        return out

    def json_only(self) -> dict:
        """The set fields that have no tensor of their own (sent in `sampling_parameters`)."""
        return {name: getattr(self, name) for name in JSON_ONLY if getattr(self, name) is not None}
