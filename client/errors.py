"""Client errors: one class per thing a caller can act on, each with a one-line message."""

from __future__ import annotations

import re


class TritonVLError(Exception):
    """Base class of every error the client raises."""


class ServerUnavailable(TritonVLError):
    """No Triton server answers at the URL (refused, unresolvable, or not live)."""


class ModelNotReady(TritonVLError):
    """The server answers but the model is unknown or not ready."""


class InvalidRequest(TritonVLError, ValueError):
    """The request was refused as invalid: by the client's checks or with the server's INVALID_ARG."""


class RequestFailed(TritonVLError):
    """The server failed the request for another reason (internal error, unavailable, ...)."""


class RequestTimeout(TritonVLError, TimeoutError):
    """The request did not complete within the client's timeout."""


class ImageError(InvalidRequest):
    """An image could not be read, fetched or encoded on the client side."""


class VideoError(InvalidRequest):
    """A video (or a frame of a frame list) could not be read on the client side."""


_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
_NOT_READY = ("unknown model", "is not found", "is not ready", "not ready", "unavailable model")


def server_message(message: str) -> str:
    """The server's error text without Triton's ensemble prefix or gRPC status decoration."""
    message = re.sub(r"^\[StatusCode\.\w+\]\s*", "", message.strip())
    message = re.sub(r"^\[\d{3}\]\s*", "", message)
    return _ENSEMBLE_PREFIX.sub("", message)


def classify(message: str, status: str | int | None = None) -> TritonVLError:
    """Map a server error (text plus gRPC status name or HTTP code when known) to a client error."""
    text = server_message(message)
    low = text.lower()
    status = str(status or "")
    if any(s in low for s in _NOT_READY):
        return ModelNotReady(text)
    if status in ("StatusCode.INVALID_ARGUMENT", "INVALID_ARGUMENT", "400"):
        return InvalidRequest(text)
    if status in ("StatusCode.DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "504") or "deadline exceeded" in low:
        return RequestTimeout(text or "deadline exceeded")
    if status in ("StatusCode.UNAVAILABLE", "UNAVAILABLE") and ("connect" in low or "socket" in low or not text):
        return ServerUnavailable(text or "server unavailable")
    return RequestFailed(text or f"request failed ({status})")
