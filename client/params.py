"""Sampling parameters as one typed object, checked with the server's rules before anything is sent."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from .errors import InvalidRequest
from .rules.sampling import EMPTY_STOP, min_tokens_error, range_error, type_error
from .rules.structured import structured_error

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
JSON_ONLY = ("min_p", "include_stop_str_in_output", "skip_special_tokens", "structured_outputs")


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
    # constrain the answer (vLLM's object): {"json": schema}, {"regex": ...}, {"choice": [...]},
    # {"grammar": EBNF} or {"json_object": True}; client.structured.from_response_format maps OpenAI's
    structured_outputs: dict | None = None

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
        """Raise InvalidRequest naming the field and the rule (the server's, ``sampling_rules``); return self."""
        self._check_types()
        for f in fields(self):
            rule = range_error(f.name, getattr(self, f.name))
            if rule:
                raise InvalidRequest(f"{f.name}={getattr(self, f.name)!r}: {rule}")
        if self.max_tokens is not None and self.min_tokens is not None:
            rule = min_tokens_error(self.min_tokens, self.max_tokens)
            if rule:
                raise InvalidRequest(f"min_tokens={self.min_tokens!r}: {rule}")
        for t in self.stop_token_ids:
            if t < 0 or t >= 2**31:  # the vocabulary is the server's to know: only the id's range here
                raise InvalidRequest(f"stop_token_ids: {t} is not a token id")
        if any(not s for s in self.stop):
            raise InvalidRequest(f"stop: {EMPTY_STOP}")
        if self.structured_outputs is not None and structured_error(self.structured_outputs):
            raise InvalidRequest(f"structured_outputs: {structured_error(self.structured_outputs)}")
        return self

    def _check_types(self) -> None:
        kinds = {"bool": bool, "int": int, "float": float}
        for f in fields(self):
            value = getattr(self, f.name)
            kind = kinds.get(str(f.type).split(" |")[0])
            if value is None or kind is None:
                continue
            problem = type_error(kind, value)
            if problem:
                raise InvalidRequest(f"{f.name}: {problem}")
            if kind is float:
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
