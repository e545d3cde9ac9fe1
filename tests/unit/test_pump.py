"""The response pump: order kept, deltas of one request merged, nothing lost, errors end requests."""

import importlib
import sys
import threading
import time
import types

import numpy as np

from tritonvl.handlers.tritonserver.pump import ResponsePump, merge


def out(text: str, ids: list[int], n: int) -> dict:
    return {"text_output": np.array([text.encode()], dtype=np.object_), "output_ids": np.array(ids, np.int32),
            "num_output_tokens": np.array([n], np.uint32)}


def test_merge_concatenates_text_and_ids_and_keeps_newest_counts():
    m = merge(out("ab", [1, 2], 2), {**out("c", [3], 3), "finish_reason": np.array([b"stop"], np.object_)})
    assert m["text_output"][0] == b"abc" and m["output_ids"].tolist() == [1, 2, 3]
    assert m["num_output_tokens"][0] == 3 and m["finish_reason"][0] == b"stop"


def test_pump_delivers_everything_in_order_even_when_it_lags():
    pump = ResponsePump()
    got = {k: [] for k in "xy"}
    gate = threading.Event()

    def sender(key):
        def send(outputs, final):
            gate.wait(5)  # the first send blocks, so later deltas pile up and merge
            got[key].append((outputs["text_output"][0].decode(), outputs["output_ids"].tolist(), final))
        return send

    sx, sy = sender("x"), sender("y")
    for i in range(50):
        pump.data("x", sx, out(str(i % 10), [i], i + 1), final=i == 49)
        pump.data("y", sy, out("y", [100 + i], i + 1), final=False)
    errors = []
    pump.error("z", lambda exc: errors.append(str(exc)), ValueError("boom"))
    gate.set()
    pump.flush()
    text = "".join(t for t, _, _ in got["x"])
    assert text == "".join(str(i % 10) for i in range(50))
    assert [i for _, ids, _ in got["x"] for i in ids] == list(range(50))
    assert [f for _, _, f in got["x"]] == [False] * (len(got["x"]) - 1) + [True]
    assert [i for _, ids, _ in got["y"] for i in ids] == [100 + i for i in range(50)]
    assert len(got["x"]) < 50  # merged while the sender lagged
    assert errors == ["boom"]


class _FakeTriton(types.ModuleType):
    """Just enough of triton_python_backend_utils for adapter.StreamSender (pure-logic test)."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __init__(self) -> None:
        super().__init__("triton_python_backend_utils")

        class TritonError(Exception):
            INTERNAL, INVALID_ARG = 13, 3

            def __init__(self, msg, code=13):
                super().__init__(msg)
                self.code = code

        self.TritonError = TritonError
        self.Tensor = lambda name, value: (name, value)
        self.InferenceResponse = lambda output_tensors=None, error=None: {"outputs": output_tensors,
                                                                          "error": error}


class _Sender:
    """Records what Triton's response sender would put on the wire, in order."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate, self.sent = gate, []

    def send(self, resp, flags=0) -> None:
        self.gate.wait(5)
        kind = "error" if resp["error"] is not None else dict(resp["outputs"])["text_output"][0][0].decode()
        self.sent.append((kind, flags))


def test_stream_sender_error_goes_out_after_the_queued_deltas(monkeypatch):
    """The real StreamSender's bound methods (a new one per call): queued deltas first, then the error, FINAL last."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeTriton())
    monkeypatch.delitem(sys.modules, "tritonvl.handlers.tritonserver.adapter", raising=False)
    adapter = importlib.import_module("tritonvl.handlers.tritonserver.adapter")
    try:
        gate = threading.Event()
        blocker, victim = (_Sender(gate) for _ in range(2))
        adapter.StreamSender._pump = ResponsePump()
        a = adapter.StreamSender(types.SimpleNamespace(get_response_sender=lambda: blocker))
        b = adapter.StreamSender(types.SimpleNamespace(get_response_sender=lambda: victim))
        a.send(out("a", [1], 1), False)  # the pump thread blocks on this one: the rest piles up
        time.sleep(0.2)
        b.send(out("x", [2], 1), False)
        b.send(out("y", [3], 2), False)
        b.send_error(ValueError("deadline"))
        gate.set()
        adapter.StreamSender.flush()
        assert victim.sent == [("xy", 0), ("error", 1)]
        assert blocker.sent == [("a", 0)]
    finally:
        sys.modules.pop("tritonvl.handlers.tritonserver.adapter", None)
