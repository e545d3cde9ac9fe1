"""The sampling fields: one table (``FIELDS``) from which the client's and the server's parameters, the
public tensors, the ``sampling_parameters`` JSON keys, the gateway's OpenAI mapping and the CLI flags are
derived, with vLLM's ranges and their messages (the client checks them before sending, the server
``handlers/sampling.py`` on arrival). No torch, no numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SamplingField:
    """One sampling field, everywhere it appears: the client's and the server's ``SamplingParams``,
    the public tensor (declared in the qwen2_5_vl, qwen2_5_vl_ensemble and preprocess config.pbtxt:
    tests/unit/test_sampling_table.py), the ``sampling_parameters`` JSON keys, the OpenAI body keys the
    gateway maps, and the `tritonvl describe/chat` flag."""

    name: str
    kind: str  # "int", "float", "bool", "strs" (list of str), "ints" (list of int), "object" (a JSON object)
    default: Any  # the server's default (the model's generation_config may change it)
    tensor: str | None = None  # Triton datatype of its own public input; None: `sampling_parameters` JSON only
    wire: str = ""  # that input's name when it is not the field's
    aliases: tuple[str, ...] = ()  # other `sampling_parameters` keys for it (vLLM's Triton backend names)
    openai: tuple[str, ...] = ()  # OpenAI request keys the gateway maps onto it (vLLM's extras included)
    check: Callable[[Any], bool] | None = None  # the range rule (vLLM's)...
    rule: str = ""  # ...as errors state it: "<name>=<value>: <rule>"
    finite: bool = False  # nan / inf refused before any range applies
    from_string: bool = False  # "0.1" / "100" / "false" taken in the JSON, as vLLM's Triton backend does
    cli: str | None = None  # help of the CLI flag --<name-with-dashes>; None: no flag
    doc: str = ""
    max_items: int | None = None  # lists: most entries...
    max_chars: int | None = None  # ...and most characters per string entry

    @property
    def input_name(self) -> str:
        return self.wire or self.name

    @property
    def python_type(self) -> type:
        return {"int": int, "float": float, "bool": bool, "strs": list, "ints": list, "object": dict}[self.kind]


# Stop bounds: the stop-string matcher's work per token grows with the strings' count and length, and
# each stop id is checked per token too (OpenAI allows 4 stop strings; vLLM has no bound).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64

FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_tokens", "int", 256, "INT32", openai=("max_tokens", "max_completion_tokens"),
                  check=lambda v: v >= 1, rule="must be at least 1", from_string=True,
                  cli="most tokens to generate (server default: 256)", doc="tokens to generate at most"),
    SamplingField("min_tokens", "int", 0, "INT32", openai=("min_tokens",), check=lambda v: v >= 0,
                  rule="must be between 0 and max_tokens", from_string=True,
                  doc="tokens to generate before eos or a stop may end the answer"),
    SamplingField("temperature", "float", 0.0, "FP32", openai=("temperature",), check=lambda v: v >= 0,
                  rule="must be >= 0", finite=True, from_string=True, cli="0 = greedy (the server's default)",
                  doc="0 = greedy"),
    SamplingField("top_p", "float", 1.0, "FP32", openai=("top_p",), check=lambda v: 0 < v <= 1,
                  rule="must be in (0, 1]", finite=True, from_string=True, cli="nucleus sampling mass",
                  doc="nucleus sampling: the smallest set of tokens whose probability reaches it"),
    SamplingField("top_k", "int", 0, "INT32", openai=("top_k",), check=lambda v: v >= -1,
                  rule="must be -1 or 0 (off) or a positive integer", from_string=True,
                  cli="sample among the k most likely tokens", doc="0 or -1 = off"),
    SamplingField("min_p", "float", 0.0, openai=("min_p",), check=lambda v: 0 <= v <= 1, rule="must be in [0, 1]",
                  finite=True, doc="drop tokens below min_p times the most likely one's probability"),
    SamplingField("repetition_penalty", "float", 1.0, "FP32", openai=("repetition_penalty",),
                  check=lambda v: v > 0, rule="must be > 0", finite=True, doc="1 = off (transformers' rule)"),
    SamplingField("presence_penalty", "float", 0.0, "FP32", openai=("presence_penalty",),
                  check=lambda v: -2 <= v <= 2, rule="must be in [-2, 2]", finite=True, from_string=True,
                  doc="OpenAI's"),
    SamplingField("frequency_penalty", "float", 0.0, "FP32", openai=("frequency_penalty",),
                  check=lambda v: -2 <= v <= 2, rule="must be in [-2, 2]", finite=True, from_string=True,
                  doc="OpenAI's"),
    SamplingField("seed", "int", None, "UINT64", openai=("seed",), check=lambda v: 0 <= v < 2**64,
                  rule="must be in [0, 2**64)", cli="for reproducible sampling", doc="per-request generator"),
    SamplingField("stop", "strs", (), "BYTES", wire="stop_words", aliases=("stop_words",), openai=("stop",),
                  cli="stop string (repeatable)", max_items=MAX_STOP_STRINGS, max_chars=MAX_STOP_CHARS,
                  doc=f"strings that end the answer (cut from it); at most {MAX_STOP_STRINGS}, of at most "
                      f"{MAX_STOP_CHARS} characters each"),
    SamplingField("stop_token_ids", "ints", (), "INT32", openai=("stop_token_ids",), max_items=MAX_STOP_TOKEN_IDS,
                  doc=f"token ids that end the answer; at most {MAX_STOP_TOKEN_IDS}"),
    SamplingField("ignore_eos", "bool", False, "BOOL", openai=("ignore_eos",), from_string=True,
                  doc="go on past the model's eos (benchmarks)"),
    SamplingField("include_stop_str_in_output", "bool", False, openai=("include_stop_str_in_output",),
                  doc="keep the stop string that ended the answer"),
    SamplingField("skip_special_tokens", "bool", True, openai=("skip_special_tokens",), from_string=True,
                  doc="leave special tokens out of the text"),
    SamplingField("n", "int", 1, check=lambda v: v == 1, rule="only n=1 is supported", from_string=True,
                  doc="answers per request"),
    SamplingField("structured_outputs", "object", None,
                  doc="vLLM's object: {json | regex | choice | grammar | json_object} (rules.structured)"),
)
BY_NAME = {f.name: f for f in FIELDS}
# every `sampling_parameters` key (field names and aliases) -> the field it sets
JSON_KEYS = {key: f.name for f in FIELDS for key in (f.name, *f.aliases)}
# the public inputs that carry a field of their own: input name -> field
TENSOR_FIELDS = {f.input_name: f for f in FIELDS if f.tensor}
# OpenAI request keys -> field (the gateway's mapping)
OPENAI_KEYS = {key: f for f in FIELDS for key in f.openai}
# the fields `tritonvl describe/chat/batch` take as flags
CLI_FIELDS = tuple(f for f in FIELDS if f.cli is not None)

MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's and vLLM's limit)

EMPTY_STOP = "empty strings are not allowed"

_KINDS = {bool: "a boolean", int: "an integer", float: "a number"}

_WORDS = {"true": True, "false": False, "1": True, "0": False}


def from_string(name: str, value):
    """A JSON string value of a ``from_string`` field as that field's type ("0.1" -> 0.1, "100" -> 100,
    "false" -> False); any other value comes back unchanged (the type check then judges it)."""
    f = BY_NAME.get(name)
    kind = f.python_type if f is not None and f.from_string else None
    if kind is None or not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if kind is bool:
            return _WORDS[text.lower()]
        number = float(text)
        return int(number) if kind is int and number.is_integer() else number
    except (KeyError, ValueError):
        return value


def range_error(name: str, value) -> str | None:
    """The rule ``value`` breaks as field ``name``, or None (also for None: the field is unset)."""
    if value is None:
        return None
    f = BY_NAME.get(name)
    if f is None:
        return None
    if f.kind in ("strs", "ints"):
        return list_error(f, value)
    if f.finite and not math.isfinite(value):
        return "must be a finite number"
    return f.rule if f.check is not None and not f.check(value) else None


def list_error(f: SamplingField, value) -> str | None:
    """A list field's bounds: ``max_items`` entries, ``max_chars`` characters per string (checked on the
    count alone first, so a huge list is refused before anything looks at its entries)."""
    noun = "strings" if f.kind == "strs" else "ids"
    if f.max_items is not None and len(value) > f.max_items:
        return f"{len(value)} {noun} is over the limit of {f.max_items}"
    if f.max_chars is not None:
        for i, item in enumerate(value):
            if isinstance(item, str) and len(item) > f.max_chars:
                return f"[{i}] has {len(item)} characters, over the limit of {f.max_chars}"
    return None


def min_tokens_error(min_tokens: int, max_tokens: int) -> str | None:
    """min_tokens against max_tokens, once both are known."""
    return None if 0 <= min_tokens <= max_tokens else f"must be between 0 and max_tokens ({max_tokens})"


def type_error(kind: type, value) -> str | None:
    """Whether ``value`` is of ``kind`` (bool, int or float); bool is not a number here."""
    ok = (isinstance(value, bool) if kind is bool
          else not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float)))
    return None if ok else f"expected {_KINDS[kind]}, got {value!r}"
