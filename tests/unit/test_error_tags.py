"""The adapter tags every error a model sends with its status, and a BLS child's tag survives the
front's hop once (not twice, not lost): what lets a client tell a deadline from a bad request when
Triton passes only the message (docs/OPENAI.md, Errors)."""

from __future__ import annotations

import importlib
import sys
import types

from tritonvl.client.rules.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable


class _FakeTriton(types.ModuleType):
    """Just enough of triton_python_backend_utils for adapter.triton_error / _bls_error."""

    def __init__(self) -> None:
        super().__init__("triton_python_backend_utils")

        class TritonError:
            INTERNAL, INVALID_ARG, UNAVAILABLE, CANCELLED = 13, 3, 14, 1

            def __init__(self, msg, code=13):
                self._msg, self._code = msg, code

            def message(self):
                return self._msg

            def code(self):
                return self._code

        self.TritonError = TritonError


def _adapter(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeTriton())
    monkeypatch.delitem(sys.modules, "tritonvl.handlers.tritonserver.adapter", raising=False)
    return importlib.import_module("tritonvl.handlers.tritonserver.adapter")


def test_triton_error_tags_each_kind(monkeypatch):
    adapter = _adapter(monkeypatch)
    try:
        pb = sys.modules["triton_python_backend_utils"]
        cases = [(InvalidArgument("top_p=3.0: must be in (0, 1]"), pb.TritonError.INVALID_ARG, "[INVALID_ARG] "),
                 (Unavailable("the server is shutting down"), pb.TritonError.UNAVAILABLE, "[UNAVAILABLE] "),
                 (Overloaded("server overloaded"), pb.TritonError.UNAVAILABLE, "[RESOURCE_EXHAUSTED] "),
                 (DeadlineExceeded("request exceeded"), pb.TritonError.UNAVAILABLE, "[DEADLINE_EXCEEDED] "),
                 (RuntimeError("boom"), pb.TritonError.INTERNAL, "[INTERNAL] internal error: RuntimeError: ")]
        for exc, code, start in cases:
            err = adapter.triton_error(exc)
            assert err.code() == code and err.message().startswith(start), err.message()
    finally:
        sys.modules.pop("tritonvl.handlers.tritonserver.adapter", None)


def test_a_childs_tag_crosses_the_front_once(monkeypatch):
    """llm's DEADLINE_EXCEEDED (Triton code UNAVAILABLE) through BLS: the front sends it with the same
    tag, once; a child error Triton made (no tag) takes its Triton code as the status."""
    adapter = _adapter(monkeypatch)
    try:
        pb = sys.modules["triton_python_backend_utils"]
        child = adapter.triton_error(DeadlineExceeded("request exceeded the 4-second deadline"))
        again = adapter.triton_error(adapter._bls_error(child))
        assert again.message() == "[DEADLINE_EXCEEDED] request exceeded the 4-second deadline"
        assert again.code() == pb.TritonError.UNAVAILABLE
        core = adapter._bls_error(pb.TritonError("Exceeds maximum queue size", pb.TritonError.UNAVAILABLE))
        assert adapter.triton_error(core).message() == "[UNAVAILABLE] Exceeds maximum queue size"
        forged = adapter.triton_error(InvalidArgument("[DEADLINE_EXCEEDED] user text first"))
        assert adapter.triton_error(adapter._bls_error(forged)).message() == \
            "[INVALID_ARG] [DEADLINE_EXCEEDED] user text first"
    finally:
        sys.modules.pop("tritonvl.handlers.tritonserver.adapter", None)
