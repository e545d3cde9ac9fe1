"""OpenAI response objects (chat and text completions, whole or as SSE chunks)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

DONE = b"data: [DONE]\n\n"
# Triton's finish reasons -> OpenAI's (a cancelled request has no reader left to tell)
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """Shapes the answers of one request; ``chat`` selects chat.completion vs text_completion."""

    chat: bool
    model: str
    include_usage: bool = False
    logprobs: bool = False  # asked: choices carry OpenAI's logprobs object, else null
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    _offset: int = 0  # text_offset of the next token (completions)

    def _logprobs(self, entries: list[dict] | None) -> dict | None:
        """The server's per-token entries (docs/INTERFACE.md) in OpenAI's shape: chat's ``content``
        list, or the completions API's parallel lists."""
        if not self.logprobs:
            return None
        entries = entries or []
        if self.chat:
            def one(e: dict) -> dict:
                return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}
            return {"content": [{**one(e), "top_logprobs": [one(a) for a in e["top_logprobs"]]} for e in entries]}
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def _head(self, chunk: bool) -> dict:
        if self.chat:
            kind, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
        else:
            kind, prefix = "text_completion", "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, text: str | None, finish: str | None, use: dict, logprobs: list[dict] | None = None,
             tool_calls: list[dict] | None = None) -> dict:
        reason = tool_finish(finish, tool_calls)
        if self.chat:
            message = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
            choice = {"index": 0, "message": message, "logprobs": self._logprobs(logprobs), "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": reason}
        return {**self._head(False), "choices": [choice], "usage": use}

    def chunk(self, text: str, finish: str | None = None, first: bool = False,
              logprobs: list[dict] | None = None, tool_calls: list[dict] | None = None, called: bool = False) -> dict:
        """One SSE chunk; ``tool_calls``: deltas of calls (gateway/tools.py); ``called``: the answer made
        calls (its finish_reason is then ``tool_calls``)."""
        reason = None if finish is None else tool_finish(finish, [{}] if called else None)
        lp = self._logprobs(logprobs) if logprobs else None
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}
        out = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, use: dict) -> dict:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": use}


def tool_finish(finish: str | None, tool_calls: list | None) -> str:
    """OpenAI's finish_reason: ``tool_calls`` when an answer that ended normally made calls."""
    reason = FINISH.get(finish or "stop", finish)
    return "tool_calls" if tool_calls and reason == "stop" else reason


def media_sizes(raw: str | None) -> dict:
    """The extra top-level field of an answer (and of a chat stream's first chunk): ``{"media_sizes":
    {...}}``, the server's geometry of the request's images and videos (docs/OPENAI.md); {} without it."""
    try:
        return {"media_sizes": json.loads(raw)} if raw else {}
    except ValueError:
        return {}


def error_event(body: dict) -> bytes:
    """An error after the stream started (the status line is already sent): OpenAI's SDKs raise it."""
    return sse(body)
