"""Sampling parameters: one typed object, validated with vLLM's ranges.

Sources, in increasing priority: the model's generation_config defaults, the vLLM-style
``sampling_parameters`` JSON, then the explicit tensors of the public interface.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass

from tritonvl.client.rules.errors import InvalidArgument, checked_text
from tritonvl.client.rules.sampling import (
    BY_NAME,
    EMPTY_STOP,
    FIELDS,
    JSON_KEYS,
    SamplingField,
    from_string,
    list_error,
    min_tokens_error,
    range_error,
    type_error,
)
from tritonvl.client.rules.structured import GrammarSpec, load_json, parse_structured_outputs


class _Rules:
    """What the server's SamplingParams does beyond holding the table's fields."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int) -> SamplingParams:
        """Raise InvalidArgument naming the field and the rule; return self."""
        for f in FIELDS:
            check_field(f.name, getattr(self, f.name), vocab_size)
        rule = min_tokens_error(self.min_tokens, self.max_tokens)
        if rule:
            raise InvalidArgument(f"min_tokens={self.min_tokens}: {rule}")
        return self


def _server_field(f: SamplingField):
    if f.kind in ("strs", "ints"):  # lists: a fresh one per object
        return f.name, f.python_type, field(default_factory=lambda d=f.default: list(d))
    return f.name, f.python_type | None if f.default is None else f.python_type, field(default=f.default)


# The sampling fields of one request with the server's defaults, from the one table (client/rules/sampling.py).
# ``structured_outputs`` holds the answer's constraint as GrammarSpec.to_dict() (None: free text).
SamplingParams = make_dataclass("SamplingParams", [_server_field(f) for f in FIELDS], bases=(_Rules,),
                                namespace={"__module__": __name__})


# Numerically safe bounds applied after validation: outside them the sampler's float32 logits
# overflow (inf / nan probabilities), which would fail a whole engine step. vLLM clamps
# temperature the same way; penalties past 100x are already saturated.
MIN_TEMPERATURE = 1e-2
REPETITION_PENALTY_RANGE = (1e-2, 1e2)


def check_field(name: str, value, vocab_size: int, where: str = "") -> None:
    """The rule of one field (``client/rules/sampling.py``, shared with the client), raising
    InvalidArgument naming ``where + name``."""
    rule = range_error(name, value)
    if rule and BY_NAME[name].kind in ("strs", "ints"):  # a list is not echoed back: it can be long
        raise InvalidArgument(f"{where}{BY_NAME[name].input_name}{'' if rule.startswith('[') else ': '}{rule}")
    if rule:
        raise InvalidArgument(f"{where}{name}={value!r}: {rule}")
    if name == "stop_token_ids":
        for t in value:
            if not 0 <= t < vocab_size:
                raise InvalidArgument(f"{where}stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})")
    elif name == "stop" and any(not s for s in value):
        raise InvalidArgument(f"{where}stop_words: {EMPTY_STOP}")


def _coerce(name: str, value, kind):
    """Type-check one value from JSON or a tensor; bool is not an int here, 2.0 is."""
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    problem = type_error(kind, value) if kind in (bool, int, float) else None
    if problem:
        raise InvalidArgument(f"{name}: {problem}")
    return float(value) if kind is float else value


def _text(name: str, value) -> str:
    """A stop string; bytes (from a STRING tensor) must be UTF-8."""
    if not isinstance(value, (bytes, str)):
        raise InvalidArgument(f"{name}: expected a string or a list of strings, got {value!r}")
    return checked_text(value, name)


def _count_first(name: str, items, where: str) -> None:
    """A list's count bound before any entry is looked at (100k stop strings are refused at once)."""
    f = BY_NAME[name]
    if f.max_items is not None and len(items) > f.max_items:
        raise InvalidArgument(f"{where}{f.input_name}: {list_error(f, items)}")


def _normalize(values: dict, vocab_size: int, where: str) -> dict:
    """Type-check one source of values and apply each field's own range rule."""
    out = {}
    for name, value in values.items():
        label = BY_NAME[name].input_name
        kind = BY_NAME[name].python_type if BY_NAME[name].kind in ("int", "float", "bool") else None
        if kind is not None:
            value = _coerce(where + label, value, kind)
        elif name == "stop":
            items = [value] if isinstance(value, (str, bytes)) else value
            if not isinstance(items, (list, tuple)):
                raise InvalidArgument(f"{where}stop_words: expected a string or a list of strings, got {value!r}")
            _count_first(name, items, where)
            value = [_text(where + label, s) for s in items]
        elif name == "stop_token_ids":
            if not isinstance(value, (list, tuple)):
                raise InvalidArgument(f"{where}stop_token_ids: expected a list of integers, got {value!r}")
            _count_first(name, value, where)
            value = [_coerce(where + label, v, int) for v in value]
        elif name == "structured_outputs":
            # a GrammarSpec comes from the guide tensors; anything else is vLLM's object
            spec = value if isinstance(value, GrammarSpec) else parse_structured_outputs(value, where + label)
            value = None if spec is None else spec.to_dict()
        check_field(name, value, vocab_size, where)
        out[name] = value
    return out


def _parse_json(json_text: str) -> dict:
    # at most MAX_JSON_DEPTH levels, a schema given inline in structured_outputs included
    parsed = load_json(json_text, "sampling_parameters")
    if not isinstance(parsed, dict):
        raise InvalidArgument("sampling_parameters: expected a JSON object")
    unknown = sorted(set(parsed) - set(JSON_KEYS))
    if unknown:
        raise InvalidArgument(f"sampling_parameters: unknown key(s) {unknown}; known: {sorted(JSON_KEYS)}")
    # numbers and booleans written as strings, where vLLM's backend takes them (SamplingField.from_string)
    return {JSON_KEYS[key]: from_string(JSON_KEYS[key], value) for key, value in parsed.items() if value is not None}


def sets_max_tokens(explicit: dict, json_text: str | None) -> bool:
    """Whether the request itself set max_tokens (its tensor or the JSON), not a default."""
    if explicit.get("max_tokens") is not None:
        return True
    return bool(json_text) and _parse_json(json_text).get("max_tokens") is not None


def build_sampling_params(
    explicit: dict,
    json_text: str | None,
    defaults: dict | None = None,
    vocab_size: int = 151936,
) -> SamplingParams:
    """Merge defaults < ``sampling_parameters`` JSON < explicit tensors, then validate.

    ``explicit`` maps field names (``stop`` for stop_words) to Python values already read
    from tensors; None values are ignored. Every value given is checked, also one that a
    higher-priority source overrides.
    """
    from_json = _normalize(_parse_json(json_text), vocab_size, "sampling_parameters.") if json_text else {}
    from_tensors = _normalize({k: v for k, v in explicit.items() if v is not None}, vocab_size, "")
    values = {**_normalize(dict(defaults or {}), vocab_size, "default "), **from_json, **from_tensors}
    if values.get("top_k") == -1:
        values["top_k"] = 0
    params = SamplingParams(**values).validate(vocab_size)
    if 0 < params.temperature < MIN_TEMPERATURE:
        params.temperature = MIN_TEMPERATURE
    low, high = REPETITION_PENALTY_RANGE
    params.repetition_penalty = min(max(params.repetition_penalty, low), high)
    return params


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
