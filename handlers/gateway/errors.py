"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and the mapping of
Triton's failures onto HTTP statuses."""

from __future__ import annotations

from tritonvl.client.errors import (
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    RequestTimeout,
    RequestTooLarge,
    ServerOverloaded,
    ServerUnavailable,
    ServiceUnavailable,
    TritonVLError,
)

# Triton's failures by the client error the transport made of their status (never by their words:
# a 400 echoes the user's text). The first class the error is an instance of wins.
# (class, HTTP status, OpenAI error type, code)
STATUS_MAP: list[tuple[type[TritonVLError], int, str, str | None]] = [
    (RequestTooLarge, 413, "invalid_request_error", "request_too_large"),
    (InvalidRequest, 400, "invalid_request_error", None),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (ServerOverloaded, 429, "rate_limit_error", "overloaded"),
    (ServerUnavailable, 503, "service_unavailable", "triton_unavailable"),
    (ModelNotReady, 503, "service_unavailable", "triton_unavailable"),
    (ServiceUnavailable, 503, "service_unavailable", "triton_unavailable"),
    (RequestTimeout, 504, "timeout", "timeout"),
]


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
    """The HTTP answer to a Triton failure, by its class (STATUS_MAP); 500 for anything else. A 400
    keeps the server's message and names the field it starts with."""
    message = " ".join(str(exc).split()) or type(exc).__name__  # one line, never a traceback
    for kind, status, type_, code in STATUS_MAP:
        if isinstance(exc, kind):
            if status == 400:
                return APIError(400, message, type_, _param(message), code)
            return APIError(status, message, type_, "model" if status == 404 else None, code)
    return APIError(500, message, "internal_error", None, "internal_error")


def _param(message: str) -> str | None:
    """The field a server message names first (``messages[0].content: ...`` -> ``messages``)."""
    head = message.split(":", 1)[0].split("=", 1)[0].split("[", 1)[0].split(".", 1)[0].strip()
    return head if head.replace("_", "").isalnum() and " " not in head else None
