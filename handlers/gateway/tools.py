"""Tool calls: OpenAI's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` in, ``tool_calls`` out.

The tools travel to the server as the ``tools`` input (JSON) and the model's own chat template renders
them (preprocess refuses a template that does not read ``tools``). The model answers in Qwen's (Hermes)
format, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (several possible):

- ``auto``: that text is parsed into ``tool_calls`` (whole, or as ``delta.tool_calls`` while streaming;
  text outside the calls stays ``content``; a block that is not a call stays text).
- ``required`` / a named function: the answer is constrained (structured outputs) to JSON, one call
  object ``{"name", "arguments"}`` for a named function or a list of them for ``required`` (vLLM's
  way), so the arguments always parse and match the function's schema; ``tool_calls`` come from it.
- ``none``: the tools are not rendered; the answer is text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.tools import check_tool_choice, check_tools, forced_schema
from tritonvl.handlers.gateway.errors import bad_request

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(name: str, arguments) -> dict:
    """One OpenAI tool call (``arguments`` as JSON text)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def call_from_json(text: str) -> dict | None:
    """``{"name": ..., "arguments": {...}}`` (arguments also as JSON text) -> a tool call; None if it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return _call(obj)


def _call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return tool_call(obj["name"], args) if isinstance(args, dict) else None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Qwen's ``<tool_call>`` blocks in ``text`` -> (the text outside them, stripped, None when empty;
    the calls). A block that does not hold a call stays in the text; so does an unclosed one that
    does not parse."""
    calls, kept, pos = [], [], 0
    for m in BLOCK.finditer(text):
        call = call_from_json(m.group(1).strip())
        kept.append(text[pos:m.start()] if call else text[pos:m.end()])
        if call:
            calls.append(call)
        pos = m.end()
    rest = text[pos:]
    cut = rest.find(OPEN)
    if cut >= 0 and (call := call_from_json(rest[cut + len(OPEN):].strip())):  # cut off before its close tag
        calls.append(call)
        rest = rest[:cut]
    kept.append(rest)
    content = "".join(kept).strip()
    return content or None, calls


def parse_forced(text: str, choice: str) -> list[dict] | None:
    """A constrained answer (a call object for a named function, a list of them for ``required``) ->
    the calls; None when it does not parse (cut off by max_tokens)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if choice == "required" else [obj]
    if not isinstance(items, list):
        return None
    calls = [_call(o) for o in items]
    return calls if calls and all(calls) else None


@dataclass
class ToolPlan:
    """One request's tools, its choice (``none``, ``auto``, ``required`` or a function's name) and
    ``parallel_tool_calls``."""

    tools: list[dict]
    choice: str
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")

    @property
    def rendered(self) -> bool:
        """The tools go to the chat template (and the answer is read for calls)."""
        return bool(self.tools) and self.choice != "none"

    def schema(self) -> dict | None:
        return forced_schema(self.tools, self.choice, self.parallel)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """A whole answer -> (content, calls)."""
        if self.forced:
            calls = parse_forced(text, self.choice)
            return (None, calls) if calls else (text, [])
        content, calls = parse_tool_calls(text)
        if not self.parallel:
            calls = calls[:1]
        return (content, calls) if calls else (text, [])

    def stream(self) -> ToolStream:
        return ToolStream(self)


def plan(body: dict) -> ToolPlan | None:
    """The request's tool fields, checked (400 naming the problem); None when it has no tools and
    asks for none."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls", f"parallel_tool_calls: expected a boolean, got {parallel!r}")
    try:
        tools = check_tools(tools) if tools is not None else []
        choice = check_tool_choice(choice, tools)
    except InvalidArgument as exc:
        param = "tool_choice" if str(exc).startswith("tool_choice") else "tools"
        raise bad_request(param, str(exc)) from None
    if not tools:
        return None
    if choice not in ("none", "auto") and (body.get("response_format") is not None
                                           or body.get("structured_outputs") is not None):
        key = "response_format" if body.get("response_format") is not None else "structured_outputs"
        raise bad_request(key, f"{key}: cannot be combined with tool_choice {choice!r} (the call's arguments "
                               "are already constrained to the function's schema)")
    return ToolPlan(tools, choice, parallel is not False)


@dataclass
class ToolStream:
    """Streamed text -> content deltas and finished calls. ``<tool_call>`` text never reaches the
    content: a possible start of the tag is held until it is told apart; whitespace around calls is
    dropped. Forced answers (JSON) are held whole and read at the end."""

    plan: ToolPlan
    calls: int = 0  # calls emitted so far
    _buf: str = ""
    _inside: bool = False
    _space: str = ""  # whitespace held back: content only if more text follows

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """New text -> (content to send now, calls finished by it)."""
        self._buf += text
        if self.plan.forced:
            return "", []
        content, calls = [], []
        while True:
            if not self._inside:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buf, OPEN)
                    content.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:at])
                self._buf, self._inside = self._buf[at + len(OPEN):], True
            else:
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                block, self._buf, self._inside = self._buf[:end], self._buf[end + len(CLOSE):], False
                call = call_from_json(block.strip())
                if call is None or (calls or self.calls) and not self.plan.parallel:
                    content.append(OPEN + block + CLOSE if call is None else "")
                else:
                    calls.append(call)
        out = self._content("".join(content))
        if calls:
            self._space = ""  # the whitespace before and between calls is no content
        return out, self._emit(calls)

    def finish(self) -> tuple[str, list[dict]]:
        """The end of the answer -> (content still held, calls)."""
        text, self._buf = self._buf, ""
        if self.plan.forced:
            calls = parse_forced(text, self.plan.choice)
            return ("", self._emit(calls)) if calls else (text, [])
        if self._inside:  # an unclosed call: a call if it parses, else text
            call = call_from_json(text.strip())
            if call is not None and (self.plan.parallel or not self.calls):
                return "", self._emit([call])
            text = OPEN + text
        out = self._content(text)
        return (out if self.calls else out + self._space), []

    def _content(self, text: str) -> str:
        """Content to send now: trailing whitespace is held (dropped if a call follows or ends the answer
        after calls), whitespace alone after a call is dropped."""
        text, self._space = self._space + text, ""
        stripped = text.rstrip()
        self._space = text[len(stripped):]
        return "" if self.calls and not stripped.strip() else stripped

    def _emit(self, calls: list[dict]) -> list[dict]:
        out = [{"index": self.calls + i, **c} for i, c in enumerate(calls)]
        self.calls += len(calls)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (held until told apart)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def delta_chunks(call: dict) -> list[dict]:
    """One finished call as OpenAI's streamed deltas: index, id, type and name first, then the arguments."""
    head = {"index": call["index"], "id": call["id"], "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""}}
    return [head, {"index": call["index"], "function": {"arguments": call["function"]["arguments"]}}]
