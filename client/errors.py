"""Client errors: one class per thing a caller can act on, each with a one-line message.

The class comes from a status, never from the words of a message: the gRPC call's status, the HTTP
status, or the tag a tritonvl model puts in front of every error it sends (``[DEADLINE_EXCEEDED] ...``,
``tritonvl.client.rules.errors``), which is all Triton passes on for an error inside a stream.
"""

from __future__ import annotations

import re

from .rules.errors import untagged


class TritonVLError(Exception):
    """Base class of every error the client raises. ``status``: the server's status for it, when one
    was given (a tag such as ``INVALID_ARG``, a gRPC status such as ``StatusCode.UNAVAILABLE``, an
    HTTP status such as ``404``)."""

    status: str | None = None


class ServerUnavailable(TritonVLError):
    """No Triton server answers at the URL (refused, unresolvable, or not live)."""


class ModelNotReady(TritonVLError):
    """The server answers but the model is unknown or not ready."""


class ModelNotFound(ModelNotReady):
    """The server has no model of that name (NOT_FOUND)."""


class InvalidRequest(TritonVLError, ValueError):
    """The request was refused as invalid: by the client's checks or with the server's INVALID_ARG."""


class RequestTooLarge(InvalidRequest):
    """The request is larger than the server or the transport takes (gRPC RESOURCE_EXHAUSTED, HTTP 413)."""


class RequestFailed(TritonVLError):
    """The server failed the request for another reason (internal error, unavailable, ...)."""


class ServiceUnavailable(RequestFailed):
    """The server took the request but cannot serve it now (UNAVAILABLE: shutting down, a model step
    gone); another try later, or on another replica, may succeed."""


class ServerOverloaded(ServiceUnavailable):
    """The server's queue is full (RESOURCE_EXHAUSTED): retry later."""


class RequestTimeout(TritonVLError, TimeoutError):
    """The request did not complete within the client's timeout or the server's deadline."""


class ImageError(InvalidRequest):
    """An image could not be read, fetched or encoded on the client side."""


class VideoError(InvalidRequest):
    """A video (or a frame of a frame list) could not be read on the client side."""


_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
_DECORATION = re.compile(r"^(\[StatusCode\.\w+\]|\[\d{3}\])\s*")  # tritonclient's str() of an exception

# A status (a model's tag, a gRPC status name, an HTTP status) -> the error class.
_BY_STATUS: dict[str, type[TritonVLError]] = {
    "INVALID_ARG": InvalidRequest, "INVALID_ARGUMENT": InvalidRequest, "400": InvalidRequest,
    "NOT_FOUND": ModelNotFound, "404": ModelNotFound,
    "UNAVAILABLE": ServiceUnavailable, "503": ServiceUnavailable,
    "RESOURCE_EXHAUSTED": ServerOverloaded, "429": ServerOverloaded,
    "DEADLINE_EXCEEDED": RequestTimeout, "504": RequestTimeout,
    "413": RequestTooLarge,
    "MODEL_NOT_READY": ModelNotReady,  # Triton's own, see _triton_status
}


def _strip(message: str) -> str:
    """Without tritonclient's status decoration and Triton's ensemble prefix (the tag, if any, first)."""
    return _ENSEMBLE_PREFIX.sub("", _DECORATION.sub("", message.strip()))


def server_message(message: str) -> str:
    """The server's error text without Triton's ensemble prefix, gRPC status decoration or status tag."""
    return untagged(_strip(message))[1]


def status_error(status: str | int | None, message: str) -> TritonVLError:
    """The error for a server error: the status in its tag (a tritonvl model's), else ``status`` (a
    gRPC ``StatusCode.X`` or HTTP status from the transport), else Triton's own in-stream errors,
    which carry no status: a request for an unknown model (NOT_FOUND), anything else RequestFailed."""
    tag, text = untagged(_strip(message))
    key = str(tag or status or "").removeprefix("StatusCode.") or _triton_status(text)
    err = _BY_STATUS.get(key, RequestFailed)(text or f"request failed ({key or 'no status'})")
    err.status = key or None
    return err


def _triton_status(text: str) -> str:
    """The status of an untagged error, which only Triton itself sends (every tritonvl model tags
    its errors): Triton's unknown-model message, by its fixed start and end (the model name between
    is the client's own)."""
    if text.startswith("Request for unknown model: "):
        return "NOT_FOUND" if text.endswith(" is not found") else "MODEL_NOT_READY"
    return ""


def classify(message: str, status: str | int | None = None) -> TritonVLError:
    """A server error -> a client error (status_error; kept under its old name)."""
    return status_error(status, message)
