"""Request errors that map onto Triton error codes (the adapter does the mapping), and the status
tag that carries a typed status through Triton's in-stream errors."""

from __future__ import annotations

import re

# Every error a tritonvl model sends starts with its status in brackets (``[DEADLINE_EXCEEDED] request
# exceeded ...``): Triton's in-stream errors (gRPC ModelStreamInfer, HTTP generate_stream) carry the
# message only, and Triton's codes have no overload or deadline. The tag is always the first thing in
# the message, so user text echoed later in it can never set the status.
STATUSES = ("INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED",
            "INTERNAL")
_TAG = re.compile(r"\[(" + "|".join(STATUSES) + r")\] ")


def tagged(status: str, message: str) -> str:
    """``message`` with ``status`` in front, always: a message that begins with user text that looks
    like a tag gets a real one before it."""
    return f"[{status}] {message}"


def untagged(message: str) -> tuple[str | None, str]:
    """(status, message without its tag); (None, message) when it has none (Triton's own errors)."""
    m = _TAG.match(message)
    return (m.group(1), message[m.end():]) if m else (None, message)


class RequestError(Exception):
    """A fault of one request; the rest of the batch carries on.

    ``code`` is Triton's: "INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL". ``status`` (one of
    STATUSES) is what the message's tag says: the code, or a finer one Triton has no code for.
    """

    code = "INVALID_ARG"
    status: str | None = None

    def __init__(self, message: str, code: str | None = None, status: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        elif self.status is None:
            self.status = self.code


class InvalidArgument(RequestError):
    code = "INVALID_ARG"


class Unavailable(RequestError):
    code = "UNAVAILABLE"


class Overloaded(Unavailable):
    """The engine's waiting queue is full: Triton's UNAVAILABLE, tagged RESOURCE_EXHAUSTED (retry later)."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(Unavailable):
    """The request outlived the llm's ``request_deadline_s``: UNAVAILABLE, tagged DEADLINE_EXCEEDED."""

    status = "DEADLINE_EXCEEDED"


def checked_text(value: bytes | str, where: str) -> str:
    """A request's text as ``str``: bytes (a STRING tensor's) must be UTF-8, and a ``str`` must have a
    UTF-8 form (JSON can escape lone surrogates, which have none); else InvalidArgument naming ``where``."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{where}: not valid Unicode ({exc.reason} at character {exc.start})") from None
    return value
