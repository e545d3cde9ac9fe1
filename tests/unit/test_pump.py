"""The response pump: order kept, deltas of one request merged, nothing lost, errors end requests."""

import importlib
import sys
import threading
import time
import types

from tritonvl.handlers.engine.outputs import SeqOutput
from tritonvl.handlers.llm.tensors import output_tensors
from tritonvl.handlers.tritonserver.pump import ResponsePump


def out(text: str, ids: list[int], n: int, final: bool = False, logprobs=None) -> SeqOutput:
    return SeqOutput(text, ids, logprobs, "stop" if final else None, num_input_tokens=5, num_output_tokens=n)


def entry(token: int) -> dict:
    return {"token": str(token), "token_id": token, "logprob": -0.5, "top_logprobs": []}


def test_merge_concatenates_text_and_ids_and_keeps_newest_counts():
    m = out("ab", [1, 2], 2).merged(out("c", [3], 3, final=True))
    assert m.text == "abc" and m.token_ids == [1, 2, 3]
    assert m.num_output_tokens == 3 and m.finish_reason == "stop" and m.logprobs is None


def test_merge_keeps_every_logprob_entry():
    """Two deltas that carry logprobs merge into one with an entry per token (the dict merge dropped them)."""
    m = out("a", [1], 1, logprobs=[entry(1)]).merged(out("bc", [2, 3], 3, final=True, logprobs=[entry(2), entry(3)]))
    assert [e["token_id"] for e in m.logprobs] == m.token_ids == [1, 2, 3]
    tensors = output_tensors(m)
    assert len(tensors["logprobs"]) == len(tensors["output_ids"]) == 3


def test_pump_merges_logprobs_while_it_lags():
    pump = ResponsePump()
    gate, got = threading.Event(), []

    def send(record):
        gate.wait(5)
        got.append(record)

    for i in range(20):
        pump.data("x", send, out("t", [i], i + 1, final=i == 19, logprobs=[entry(i)]))
    gate.set()
    pump.flush()
    assert len(got) < 20  # merged
    assert [e["token_id"] for r in got for e in r.logprobs] == [i for r in got for i in r.token_ids] == list(range(20))


def test_pump_delivers_everything_in_order_even_when_it_lags():
    pump = ResponsePump()
    got = {k: [] for k in "xy"}
    gate = threading.Event()

    def sender(key):
        def send(record):
            gate.wait(5)  # the first send blocks, so later deltas pile up and merge
            got[key].append((record.text, record.token_ids, record.finished))
        return send

    sx, sy = sender("x"), sender("y")
    for i in range(50):
        pump.data("x", sx, out(str(i % 10), [i], i + 1, final=i == 49))
        pump.data("y", sy, out("y", [100 + i], i + 1))
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
        a = adapter.StreamSender(types.SimpleNamespace(get_response_sender=lambda: blocker), output_tensors)
        b = adapter.StreamSender(types.SimpleNamespace(get_response_sender=lambda: victim), output_tensors)
        a.send(out("a", [1], 1))  # the pump thread blocks on this one: the rest piles up
        time.sleep(0.2)
        b.send(out("x", [2], 1))
        b.send(out("y", [3], 2))
        b.send_error(ValueError("deadline"))
        gate.set()
        adapter.StreamSender.flush()
        assert victim.sent == [("xy", 0), ("error", 1)]
        assert blocker.sent == [("a", 0)]
    finally:
        sys.modules.pop("tritonvl.handlers.tritonserver.adapter", None)
