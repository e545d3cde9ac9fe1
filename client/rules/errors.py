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
