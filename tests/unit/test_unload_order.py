"""What a stub lets go of, and when (issue 30), with a fake triton_python_backend_utils:

- TritonMetrics: the metric families stay held by the adapter module when the model object is gone
  (the stub's own teardown must never be the one that frees them); close() deletes them, once, and
  later updates do nothing.
- The pump's stop() sends what was queued, then its thread ends.
- Finished BLS streams are let go only after the hold, or all at once by release_bls().
- Front.close() ends the cancel watcher and waits for the request threads.
- Senders send only the outputs the request asked for.
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading
import time
import types

import pytest

from tritonvl.handlers.tritonserver.pump import ResponsePump


class _Family:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
    deleted: list[str] = []

    def __init__(self, name, description, kind) -> None:
        self.name = name

    def Metric(self, labels=None, buckets=None):  # noqa: N802 (pb_utils' name)
        return types.SimpleNamespace(increment=lambda v: None, set=lambda v: None, observe=lambda v: None)

    def __del__(self) -> None:
        _Family.deleted.append(self.name)


class _FakeTriton(types.ModuleType):
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __init__(self) -> None:
        super().__init__("triton_python_backend_utils")
        self.MetricFamily = _Family
        self.Tensor = lambda name, value: (name, value)
        self.InferenceResponse = lambda output_tensors=None, error=None: {"outputs": output_tensors, "error": error}


@pytest.fixture
def adapter(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeTriton())
    monkeypatch.delitem(sys.modules, "tritonvl.handlers.tritonserver.adapter", raising=False)
    yield importlib.import_module("tritonvl.handlers.tritonserver.adapter")
    sys.modules.pop("tritonvl.handlers.tritonserver.adapter", None)


def test_metric_families_outlive_the_model_object_until_closed(adapter):
    _Family.deleted.clear()
    model = types.SimpleNamespace(metrics=adapter.TritonMetrics("vision_encoder", only=("image_cache_hits",)))
    metrics = model.metrics
    del model
    gc.collect()
    assert _Family.deleted == []  # the model object went (as in ~Stub): the families did not
    metrics.close()
    assert _Family.deleted == ["tritonvl_image_cache_hits_total"]
    assert metrics not in adapter._OPEN_METRICS
    snapshot = types.SimpleNamespace(counters={"image_cache_hits": 3}, gauges={}, observations={})
    metrics.update(snapshot)  # after close: nothing, no error
    metrics.close()
    assert _Family.deleted == ["tritonvl_image_cache_hits_total"]


def test_pump_stop_sends_what_was_queued_then_ends():
    pump, sent, gate = ResponsePump(), [], threading.Event()

    def send(record):
        gate.wait(5)
        sent.append(record)

    class Rec:
        def __init__(self, n):
            self.n = n

        def merged(self, other):
            return Rec(self.n + other.n)

    pump.data("a", send, Rec(1))
    time.sleep(0.1)
    pump.data("b", send, Rec(2))
    pump.data("b", send, Rec(3))
    gate.set()
    assert pump.stop(timeout=5)
    assert not pump.thread.is_alive()
    assert [r.n for r in sent] == [1, 5]


def test_finished_streams_are_kept_for_the_hold_then_let_go(adapter):
    keeper = adapter._Keeper(hold_s=0.2)
    gone = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def __del__(self):
            gone.append(self.name)

    keeper.keep(Stream("first"))
    gc.collect()
    assert gone == [] and len(keeper) == 1
    time.sleep(0.25)
    keeper.keep(Stream("second"))  # lets go of what is due, in this (Python) thread
    gc.collect()
    assert gone == ["first"] and len(keeper) == 1
    keeper.release()
    gc.collect()
    assert gone == ["first", "second"] and len(keeper) == 0


def test_front_close_ends_its_threads():
    from tritonvl.handlers.tritonserver import front as front_mod

    release = threading.Event()

    def stream(model, inputs, outputs, key):
        release.wait(5)
        yield {"text_output": "", "finish_reason": "length"}

    calls = front_mod.ModelCalls(lambda m, i, o: {n: n for n in o}, stream, lambda m, k: None)
    front = front_mod.Front(calls, poll_seconds=0.01)
    done = threading.Event()
    client = types.SimpleNamespace(inputs=lambda: [], send=lambda t, final: done.set(), send_error=lambda e: done.set(),
                                   is_cancelled=lambda: False)
    front.submit(client)
    time.sleep(0.1)
    assert not front.close(timeout=0.2)  # a request still runs: not all ended
    release.set()
    assert front.close(timeout=5)
    assert done.is_set() and not front._watcher.is_alive() and front.inflight == 0


def test_senders_send_only_the_requested_outputs(adapter):
    class Sender:
        def __init__(self):
            self.sent = []

        def send(self, response, flags=0):
            self.sent.append(([name for name, _ in response["outputs"]], flags))

    sender = Sender()
    request = types.SimpleNamespace(get_response_sender=lambda: sender, requested_output_names=lambda: ["text_output"])
    assert adapter.requested_outputs(request) == frozenset({"text_output"})
    stream = adapter.StreamSender(request, lambda record: {"text_output": [b"x"], "output_ids": [1]})
    stream._send_now(types.SimpleNamespace(finished=True))
    assert sender.sent == [(["text_output"], 1)]
    assert adapter.requested_outputs(types.SimpleNamespace()) is None  # cannot tell: everything goes
    adapter.StreamSender.close()
