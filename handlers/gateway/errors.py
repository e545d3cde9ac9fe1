"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and the mapping of
Triton's failures onto HTTP statuses."""

from __future__ import annotations

from tritonvl.client.errors import (
    InvalidRequest,
    ModelNotReady,
    RequestTimeout,
    ServerUnavailable,
    TritonVLError,
)

# Triton's in-stream errors carry no status code (only text), so overload is recognised by the
# messages our engine and Triton's schedulers use for it.
_OVERLOAD = ("overloaded", "queue is full", "exceeds maximum queue size")
_UNAVAILABLE = ("shutting down", "is not ready", "unavailable")


class APIError(Exception):
    """An HTTP error answer; ``body()`` is what the client reads."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str) -> APIError:
    return APIError(400, message, "invalid_request_error", param, None)


def unsupported(param: str, why: str = "is not supported by this server") -> APIError:
    return APIError(400, f"{param}: {why}", "invalid_request_error", param, "unsupported_parameter")


def from_triton(exc: TritonVLError) -> APIError:
    """400 for INVALID_ARG (the server's message kept), 404 unknown model, 429 overload,
    503 unavailable, 504 timeout, 500 otherwise."""
    message = " ".join(str(exc).split()) or type(exc).__name__  # one line, never a traceback
    low = message.lower()
    if any(m in low for m in _OVERLOAD):
        return APIError(429, message, "rate_limit_error", None, "overloaded")
    if isinstance(exc, ModelNotReady) and ("unknown model" in low or "not found" in low):
        return APIError(404, message, "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, (ServerUnavailable, ModelNotReady)) or any(m in low for m in _UNAVAILABLE):
        return APIError(503, message, "service_unavailable", None, "triton_unavailable")
    if isinstance(exc, RequestTimeout):
        return APIError(504, message, "timeout", None, "timeout")
    if isinstance(exc, InvalidRequest):
        return APIError(400, message, "invalid_request_error", _param(message), None)
    return APIError(500, message, "internal_error", None, "internal_error")


def _param(message: str) -> str | None:
    """The field a server message names first (``messages[0].content: ...`` -> ``messages``)."""
    head = message.split(":", 1)[0].split("=", 1)[0].split("[", 1)[0].split(".", 1)[0].strip()
    return head if head.replace("_", "").isalnum() and " " not in head else None
