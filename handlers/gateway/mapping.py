"""OpenAI request bodies -> requests on the public Triton model.

Chat ``messages`` go to Triton unchanged as the ``messages`` tensor (JSON): the server already
takes OpenAI content parts (``text``, ``image_url`` with data URIs, bare base64 or http(s) URLs
under its allow-list, ``video_url`` / ``video`` with data URIs or frame lists), system and
multi-turn, so images and videos are fetched and checked in one place, under one URL policy. Sampling fields become the public tensors / ``sampling_parameters`` JSON
(through the client's SamplingParams, which checks the server's ranges before anything is sent).
A field this server cannot honour is a 400 naming it, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tritonvl.client.errors import InvalidRequest
from tritonvl.client.params import SamplingParams
from tritonvl.client.request import Request
from tritonvl.client.rules.sampling import MAX_TOP_LOGPROBS, OPENAI_KEYS
from tritonvl.client.rules.structured import from_response_format
from tritonvl.handlers.gateway.errors import bad_request, unsupported
from tritonvl.handlers.gateway.tools import ToolPlan
from tritonvl.handlers.gateway.tools import plan as tool_plan

# OpenAI / vLLM name -> SamplingParams field (the sampling table's ``openai`` keys)
SAMPLING = {key: f.name for key, f in OPENAI_KEYS.items()}
# Accepted and without effect on the answer (they describe the caller or the billing).
IGNORED = {"user", "metadata", "store", "service_tier"}
# Accepted only at a value that asks for nothing we lack (null is always fine).
DEFAULT_ONLY = {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",),
                "logit_bias": ({},),
                "use_beam_search": (False,), "add_generation_prompt": (True,)}
_COMMON = {"model", "stream", "stream_options", *SAMPLING, *IGNORED, "n", "logprobs", "logit_bias"} - {
    "max_completion_tokens"}
CHAT_KEYS = _COMMON | {"messages", "max_completion_tokens", "response_format", "structured_outputs",
                       "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "add_generation_prompt",
                       "mm_processor_kwargs"}
COMPLETION_KEYS = _COMMON | {"prompt", "echo", "suffix", "best_of", "use_beam_search", "response_format",
                             "structured_outputs"}


@dataclass
class TritonRequest(Request):
    """A client Request plus public inputs the client does not send itself (``apply_chat_template``
    for raw prompts; structured-output inputs later)."""

    extra: dict[str, tuple[object, str]] = field(default_factory=dict)

    def fields(self) -> dict[str, tuple[object, str]]:
        return {**super().fields(), **self.extra}


@dataclass
class Parsed:
    request: TritonRequest
    model: str | None  # as the caller named it (None: the default)
    stream: bool
    include_usage: bool
    logprobs: bool = False  # the answer carries OpenAI's logprobs object
    tools: ToolPlan | None = None  # tools rendered and the answer read for calls (gateway/tools.py)



def logprobs_inputs(body: dict, chat: bool) -> dict[str, tuple[object, str]]:
    """OpenAI's logprobs fields -> the server's return_logprobs / top_logprobs inputs ({} when not asked).
    Chat: ``logprobs`` (bool) and ``top_logprobs`` (0-20, needs logprobs); completions: ``logprobs`` (int,
    the number of alternatives)."""
    asked, top = body.get("logprobs"), body.get("top_logprobs") if chat else None
    if chat:
        if asked is not None and not isinstance(asked, bool):
            raise bad_request("logprobs", f"logprobs: expected a boolean, got {asked!r}")
        if top is not None and not asked:
            raise bad_request("top_logprobs", "top_logprobs: only allowed when logprobs is true")
    elif asked is not None:
        asked, top = True, asked
    if not asked:
        return {}
    name = "top_logprobs" if chat else "logprobs"
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise bad_request(name, f"{name}: expected an integer between 0 and {MAX_TOP_LOGPROBS}, got {top!r}")
    return {"return_logprobs": (True, "BOOL"), "top_logprobs": (top or 0, "INT32")}


def mm_inputs(body: dict) -> dict[str, tuple[object, str]]:
    """vLLM's ``mm_processor_kwargs`` extra (an object: image min/max_pixels, video fps / num_frames /
    max_frames / total_pixels) -> the server's input of that name; the server checks its keys."""
    kwargs = body.get("mm_processor_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise bad_request("mm_processor_kwargs", "mm_processor_kwargs: expected an object such as {\"fps\": 1}")
    return {"mm_processor_kwargs": (json.dumps(kwargs), "BYTES")}


def parse_chat(body: dict) -> Parsed:
    check_keys(body, CHAT_KEYS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "messages: expected a non-empty list of {role, content} objects")
    messages = [_message(m, i) for i, m in enumerate(messages)]
    stream, include_usage = _stream(body)
    logprobs = logprobs_inputs(body, chat=True)
    tools = tool_plan(body)
    if tools is not None and tools.forced:  # the answer is the call(s), constrained to the schema
        body = {**body, "structured_outputs": {"json": tools.schema()}}
    extra = {**logprobs, **mm_inputs(body)}
    if tools is not None and tools.rendered:
        extra["tools"] = (json.dumps(tools.tools, ensure_ascii=False), "BYTES")
    req = TritonRequest(sampling(body), messages=messages, stream=stream, extra=extra)
    return Parsed(req, _model(body), stream, include_usage, bool(logprobs),
                  tools if tools is not None and tools.rendered else None)


def parse_completion(body: dict) -> Parsed:
    check_keys(body, COMPLETION_KEYS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt", "prompt: expected a string (one prompt per request; token ids are not "
                                    "accepted)")
    stream, include_usage = _stream(body)
    # OpenAI's default for completions is 16 tokens; vLLM follows it
    params = sampling({"max_tokens": 16, **{k: v for k, v in body.items() if v is not None}})
    extra = logprobs_inputs(body, chat=False)
    req = TritonRequest(params, prompt=prompt, stream=stream, extra={"apply_chat_template": (False, "BOOL"), **extra})
    return Parsed(req, _model(body), stream, include_usage, bool(extra))


def structured_output(body: dict) -> dict | None:
    """OpenAI's ``response_format`` (json_object, json_schema) or vLLM's ``structured_outputs`` extra
    field, as one ``structured_outputs`` object for the server (docs/STRUCTURED.md); None: free text."""
    try:
        from_format = from_response_format(body.get("response_format"))
    except ValueError as exc:
        raise bad_request("response_format", str(exc)) from None
    extra = body.get("structured_outputs")
    if from_format is not None and extra is not None:
        raise bad_request("structured_outputs", "structured_outputs: give it or response_format, not both")
    return from_format if from_format is not None else extra


def check_keys(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise unsupported(key)
    for key, values in DEFAULT_ONLY.items():
        if key in body and body[key] is not None and not _same(body[key], values):
            why = "only n=1 is supported" if key == "n" else f"only {values[0]!r} is supported"
            raise unsupported(key, why)


def sampling(body: dict) -> SamplingParams:
    values: dict = {}
    for name, target in SAMPLING.items():
        value = body.get(name)
        if value is None or (name == "max_tokens" and body.get("max_completion_tokens") is not None):
            continue
        values[target] = _typed(name, value)
    constraint = structured_output(body)
    if constraint is not None:
        values["structured_outputs"] = constraint
    try:
        return SamplingParams.from_kwargs(**values)
    except InvalidRequest as exc:  # "temperature=-1.0: must be >= 0": the client's rule, named
        name = str(exc).split(":", 1)[0].split("=", 1)[0]
        raise bad_request(name if name in SAMPLING or name == "structured_outputs" else None, str(exc)) from None


def _typed(name: str, value):
    f = OPENAI_KEYS[name]
    kind = f.python_type if f.kind in ("int", "float", "bool") else None
    if kind is bool and not isinstance(value, bool):
        raise bad_request(name, f"{name}: expected a boolean, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_request(name, f"{name}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(name, f"{name}: expected a number, got {value!r}")
        return float(value)
    if f.kind == "strs":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise bad_request(name, f"{name}: expected a non-empty string or a list of them")
    if f.kind == "ints" and (not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)):
        raise bad_request(name, f"{name}: expected a list of integers")
    return value


def _message(msg, i: int) -> dict:
    if not isinstance(msg, dict) or "role" not in msg:
        raise bad_request("messages", f"messages[{i}]: expected an object with 'role' and 'content'")
    if msg["role"] == "developer":  # OpenAI's newer name for the system role
        msg = {**msg, "role": "system"}
    return msg


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream", f"stream: expected a boolean, got {stream!r}")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad_request("stream_options", "stream_options: only allowed when stream is true")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise unsupported("stream_options", "only {'include_usage': bool} is supported")
    usage = opts.get("include_usage") or False
    if not isinstance(usage, bool):
        raise bad_request("stream_options", f"stream_options.include_usage: expected a boolean, got {usage!r}")
    return stream, usage


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model", f"model: expected a string, got {model!r}")
    return model


def _same(value, allowed: tuple) -> bool:
    # bool is an int in Python: n=True must not pass as n=1
    return any(type(value) is type(a) and value == a for a in allowed)
