"""Sampling parameters as one typed object, checked with the server's rules before anything is sent."""

from __future__ import annotations

import json
from dataclasses import field, make_dataclass

from .errors import InvalidRequest
from .rules.sampling import (
    EMPTY_STOP,
    FIELDS,
    TENSOR_FIELDS,
    SamplingField,
    min_tokens_error,
    range_error,
    type_error,
)
from .rules.structured import structured_error


class _Checks:
    """What to generate. ``None`` leaves a field to the server's default (greedy, 256 tokens); the fields
    are the table's (``rules/sampling.py`` FIELDS).

    The same ranges as the server (vLLM's): ``validate()`` raises ``InvalidRequest`` naming the
    field and the rule, so a mistake fails before the request is sent. ``structured_outputs``
    constrains the answer (vLLM's object): {"json": schema}, {"regex": ...}, {"choice": [...]},
    {"grammar": EBNF} or {"json_object": True}; ``rules.structured.from_response_format`` maps OpenAI's.
    """

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kwargs) -> SamplingParams:
        """``base`` (or defaults) updated with keyword arguments; unknown names are a TypeError."""
        known = {f.name for f in FIELDS}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        values = {f.name: getattr(base, f.name) for f in FIELDS} if base else {}
        values.update(kwargs)
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        values["stop"] = list(values.get("stop") or [])
        values["stop_token_ids"] = list(values.get("stop_token_ids") or [])
        return cls(**values).validate()

    def validate(self) -> SamplingParams:
        """Raise InvalidRequest naming the field and the rule (the server's, ``rules/sampling.py``); return self."""
        self._check_types()
        for f in FIELDS:
            rule = range_error(f.name, getattr(self, f.name))
            if rule and f.kind in ("strs", "ints"):  # a list is not repeated in its own error
                raise InvalidRequest(f"{f.name}{'' if rule.startswith('[') else ': '}{rule}")
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
        for f in FIELDS:
            value = getattr(self, f.name)
            kind = f.python_type if f.kind in ("int", "float", "bool") else None
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
        out: dict[str, tuple[object, str]] = {}
        for name, f in TENSOR_FIELDS.items():
            value = getattr(self, f.name)
            if value is not None and value != []:
                out[name] = (list(value) if isinstance(value, list) else value, f.tensor)
        extra = self.json_only()
        if extra:
            out["sampling_parameters"] = (json.dumps(extra), "BYTES")
        return out

    def json_only(self) -> dict:
        """The set fields that have no tensor of their own (sent in `sampling_parameters`)."""
        return {f.name: getattr(self, f.name) for f in FIELDS if not f.tensor and getattr(self, f.name) is not None}


def _client_field(f: SamplingField):
    if f.kind in ("strs", "ints"):
        return f.name, list, field(default_factory=list)
    return f.name, f.python_type | None, field(default=None)


SamplingParams = make_dataclass("SamplingParams", [_client_field(f) for f in FIELDS], bases=(_Checks,),
                                namespace={"__module__": __name__})
SamplingParams.__doc__ = _Checks.__doc__
