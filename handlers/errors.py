"""Request errors that map onto Triton error codes (the adapter does the mapping)."""

from __future__ import annotations


class RequestError(Exception):
    """A fault of one request; the rest of the batch carries on.

    ``code`` is one of "INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL".
    """

    code = "INVALID_ARG"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(RequestError):
    code = "INVALID_ARG"


class Unavailable(RequestError):
    code = "UNAVAILABLE"
