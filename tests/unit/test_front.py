"""The public front's logic with fake model calls: responses forwarded in order with the final flag
on the one that carries finish_reason, errors forwarded, a cancelled client's request stopped once,
and no cancellation probe after the final response (Triton crashes on one)."""

from __future__ import annotations

import threading
import time

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.tritonserver.front import Front, ModelCalls


class FakeClient:
    def __init__(self) -> None:
        self.sent: list[tuple[dict, bool]] = []
        self.errors: list[Exception] = []
        self.cancelled = False
        self.finished = threading.Event()
        self.probes_after_final = 0

    def inputs(self) -> list:
        return ["text_input"]

    def send(self, tensors: dict, final: bool) -> None:
        self.sent.append((tensors, final))
        if final:
            self.finished.set()

    def send_error(self, exc: Exception) -> None:
        self.errors.append(exc)
        self.finished.set()

    def is_cancelled(self) -> bool:
        if self.finished.is_set():
            self.probes_after_final += 1
        return self.cancelled


def fake_calls(n_tokens: int, stops: list, fail: str = "", delay: float = 0.0) -> ModelCalls:
    stopped = threading.Event()

    def call(model, inputs, outputs):
        if model == fail:
            raise InvalidArgument(f"{model}: bad")
        return {name: f"{model}.{name}" for name in outputs}

    def stream(model, inputs, outputs, key):
        assert inputs == ["preprocess.input_ids", "vision_encoder.image_embeds", "preprocess.image_grid_thw",
                          "vision_encoder.image_hashes", "preprocess.request", "preprocess.request_seal",
                          "vision_encoder.embeds_seal", "preprocess.media_sizes"]
        for i in range(n_tokens):
            if stopped.is_set():
                yield {"text_output": "", "finish_reason": "cancelled"}
                return
            time.sleep(delay)
            yield {"text_output": str(i)}
        yield {"text_output": "", "finish_reason": "length"}

    def stop(model, key):
        stops.append((model, key))
        stopped.set()

    return ModelCalls(call, stream, stop)


def test_responses_forwarded_final_flag_on_the_last():
    client = FakeClient()
    Front(fake_calls(3, [])).serve(client)
    assert [(t["text_output"], final) for t, final in client.sent] == [("0", False), ("1", False), ("2", False),
                                                                      ("", True)]
    assert not client.errors


def test_a_step_error_goes_to_the_client():
    client = FakeClient()
    Front(fake_calls(3, [], fail="vision_encoder")).serve(client)
    assert client.sent == [] and str(client.errors[0]) == "vision_encoder: bad"


def test_a_cancelled_client_is_stopped_once_and_never_probed_after_its_final_response():
    stops: list = []
    front = Front(fake_calls(10_000, stops, delay=0.001), poll_seconds=0.01)
    client = FakeClient()
    front.submit(client)
    time.sleep(0.1)
    client.cancelled = True
    assert client.finished.wait(5)
    time.sleep(0.1)
    assert len(stops) == 1 and stops[0][0] == "llm"
    assert client.sent[-1] == ({"text_output": "", "finish_reason": "cancelled"}, True)
    assert len(client.sent) < 10_000
    assert client.probes_after_final == 0


def test_new_requests_refused_while_the_server_stops():
    front = Front(fake_calls(3, []))
    front.begin_drain()
    client = FakeClient()
    front.serve(client)
    assert client.sent == [] and "shutting down" in str(client.errors[0])


def test_requests_past_max_inflight_are_refused_at_once_and_the_rest_served():
    """A flood cannot make the front start a thread per request without bound (issue 24)."""
    from tritonvl.client.rules.errors import Overloaded

    front = Front(fake_calls(200, [], delay=0.01), max_inflight=2)
    clients = [FakeClient() for _ in range(5)]
    for c in clients:
        front.submit(c)
    refused = [c for c in clients if c.errors]
    assert len(refused) == 3 and all(isinstance(c.errors[0], Overloaded) for c in refused)
    assert "max_inflight_requests" in str(refused[0].errors[0])
    served = [c for c in clients if not c.errors]
    assert all(c.finished.wait(30) for c in served) and all(c.sent[-1][1] for c in served)
    later = FakeClient()  # the slots are free again
    front.submit(later)
    assert later.finished.wait(30) and not later.errors


def _interface(path) -> tuple:
    """(max_batch_size, inputs, outputs) of a config.pbtxt, comments dropped."""
    import re

    text = re.sub(r"#.*", "", path.read_text()).split("ensemble_scheduling")[0]
    blocks = re.findall(r"\{([^{}]*)\}", text)
    tensors = [tuple(re.findall(r"(\w+):\s*(\"[^\"]*\"|\[[^\]]*\]|\w+)", b)) for b in blocks if "data_type" in b]
    inputs_end = text.index("output [")
    starts = [text.index(b) for b in blocks if "data_type" in b]
    return (re.search(r"max_batch_size:\s*(\d+)", text).group(1),
            [t for t, s in zip(tensors, starts) if s < inputs_end], [t for t, s in zip(tensors, starts) if s > inputs_end])


def test_front_and_ensemble_have_the_same_tensor_interface():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2] / "model_repository"
    front, ensemble = _interface(repo / "qwen2_5_vl" / "config.pbtxt"), _interface(repo / "qwen2_5_vl_ensemble" / "config.pbtxt")
    assert front[1] and front[2]
    assert front == ensemble, "model_repository/qwen2_5_vl and qwen2_5_vl_ensemble must declare the same tensors"


def test_a_stream_llm_never_ends_is_ended_by_the_front_drain_deadline():
    """An llm that cannot answer any more (its stub died) must not hold the request, and Triton's exit
    with it: past the front's drain deadline the client gets a final error, and nothing after it."""
    release = threading.Event()

    def stream(model, inputs, outputs, key):
        yield {"text_output": "a"}
        release.wait(10)  # a dead llm: no more responses until the test lets go
        yield {"text_output": "late"}
        yield {"text_output": "", "finish_reason": "length"}

    calls = ModelCalls(lambda model, inputs, outputs: {name: f"{model}.{name}" for name in outputs}, stream,
                  lambda model, key: None)
    front = Front(calls)
    client = FakeClient()
    thread = threading.Thread(target=front.serve, args=(client,))
    thread.start()
    time.sleep(0.2)
    front.begin_drain(0.2)
    assert client.finished.wait(5), "the request was not ended by the drain deadline"
    assert "shutting down" in str(client.errors[0])
    release.set()
    thread.join(5)
    assert [t["text_output"] for t, _ in client.sent] == ["a"]  # nothing after the final error
    assert len(client.errors) == 1
