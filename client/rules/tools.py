"""OpenAI function tools: the shape rules the gateway and preprocess share, and the JSON schema that
constrains a forced call (``tool_choice`` ``required`` or a named function) with structured outputs.

A tool is ``{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}``;
``parameters`` is a JSON schema of an object (absent: no arguments). The chat template receives the
tools in this shape (Qwen's templates write each one with ``tojson``).
"""

from __future__ import annotations

import re
from typing import Any

from tritonvl.client.rules.errors import InvalidArgument

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
CHOICES = ("none", "auto", "required")


def check_tools(value: Any, where: str = "tools") -> list[dict]:
    """The tools list, normalized (``{"type": "function", "function": {...}}`` each, unknown keys
    refused); InvalidArgument naming the first problem."""
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: expected a list of {{'type': 'function', 'function': {{...}}}} objects")
    if len(value) > MAX_TOOLS:
        raise InvalidArgument(f"{where}: {len(value)} tools is more than {MAX_TOOLS}")
    out, names = [], set()
    for i, tool in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise InvalidArgument(f"{at}: expected an object {{'type': 'function', 'function': {{...}}}}")
        if tool.get("type") != "function":
            raise InvalidArgument(f"{at}.type: {tool.get('type')!r} is not supported (only 'function')")
        if set(tool) - {"type", "function"}:
            raise InvalidArgument(f"{at}: unknown key(s) {sorted(set(tool) - {'type', 'function'})}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidArgument(f"{at}.function: expected an object with 'name' (and 'description', 'parameters')")
        if set(fn) - FUNCTION_KEYS:
            raise InvalidArgument(f"{at}.function: unknown key(s) {sorted(set(fn) - FUNCTION_KEYS)}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidArgument(f"{at}.function.name: expected 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise InvalidArgument(f"{at}.function.name: {name!r} is given twice")
        names.add(name)
        if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
            raise InvalidArgument(f"{at}.function.description: expected a string")
        if "strict" in fn and fn["strict"] is not None and not isinstance(fn["strict"], bool):
            raise InvalidArgument(f"{at}.function.strict: expected a boolean")
        params = fn.get("parameters")
        if params is not None:
            _check_parameters(params, f"{at}.function.parameters")
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def _check_parameters(schema: Any, where: str) -> None:
    """A function's parameters: a JSON schema describing an object."""
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{where}: expected a JSON schema object such as {{'type': 'object', 'properties': {{}}}}")
    kind = schema.get("type", "object")
    if kind != "object":
        raise InvalidArgument(f"{where}.type: the arguments are a JSON object, so the type must be 'object', "
                              f"got {kind!r}")
    props = schema.get("properties")
    if props is not None and not (isinstance(props, dict) and all(isinstance(p, (dict, bool)) for p in props.values())):
        raise InvalidArgument(f"{where}.properties: expected an object mapping names to schemas")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise InvalidArgument(f"{where}.required: expected a list of property names")


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def check_tool_choice(value: Any, tools: list[dict], where: str = "tool_choice") -> str:
    """``none``, ``auto``, ``required`` or the named function's name (OpenAI's
    ``{"type": "function", "function": {"name": ...}}``); InvalidArgument for anything else or a name
    that is not among ``tools``. Absent: ``auto`` with tools, ``none`` without (OpenAI's defaults)."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in CHOICES:
            raise InvalidArgument(f"{where}: {value!r} is not one of {CHOICES} or "
                                  "{'type': 'function', 'function': {'name': ...}}")
        if value == "required" and not tools:
            raise InvalidArgument(f"{where}: 'required' needs a non-empty tools list")
        return value
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InvalidArgument(f"{where}: expected 'none', 'auto', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}")
    if name not in tool_names(tools):
        raise InvalidArgument(f"{where}.function.name: {name!r} is not one of the tools "
                              f"({tool_names(tools) or 'none given'})")
    return name


def arguments_schema(tool: dict) -> dict:
    """The JSON schema of one function's arguments (no ``parameters``: an object without properties)."""
    params = tool["function"].get("parameters")
    return params if params else {"type": "object", "properties": {}, "additionalProperties": False}


def call_schema(tool: dict) -> dict:
    """``{"name": <the function's name>, "arguments": <its parameters>}``: one call, as Qwen writes
    inside ``<tool_call>``."""
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                             "arguments": arguments_schema(tool)},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_schema(tools: list[dict], choice: str, parallel: bool = True) -> dict | None:
    """The JSON schema a forced call's answer is constrained to (None for ``none`` / ``auto``): for a
    named function one call object; for ``required`` a list of calls (any of the tools each; one item
    when ``parallel`` is false), as vLLM does it."""
    if choice in ("none", "auto"):
        return None
    if choice != "required":
        return call_schema(next(t for t in tools if t["function"]["name"] == choice))
    calls = [call_schema(t) for t in tools]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
