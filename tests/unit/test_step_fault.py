"""A fault in an engine step fails every request in flight with an error response (streams get their
deltas first, the error last) and the engine goes on serving. The real engine on the tiny model, in
process (OfflinePipeline); the fault is injected into the model runner."""

from __future__ import annotations

import pytest

from tritonvl.handlers.preprocess.preprocessor import RawRequest
from tritonvl.handlers.tools.offline import OfflinePipeline


@pytest.fixture(scope="module")
def pipe(model_dir):
    with OfflinePipeline(model_dir, kv_cache_bytes=1 << 24, max_num_seqs=8) as p:
        yield p


def req(text: str, stream: bool = False, n: int = 12) -> RawRequest:
    return RawRequest(text_input=text.encode(), sampling={"max_tokens": n, "ignore_eos": True}, stream=stream)


def test_step_fault_fails_all_in_flight_and_the_engine_keeps_serving(pipe, monkeypatch):
    runner = pipe.engine.runner
    real, steps = runner.run, []

    def faulty(batch):
        steps.append(len(batch))
        if len(steps) == 4:  # a few decode steps in: every request is mid-generation
            raise RuntimeError("device lost during the step")
        return real(batch)

    monkeypatch.setattr(runner, "run", faulty)
    results = pipe.generate([req("One"), req("Two", stream=True), req("Three"), req("Four", stream=True)],
                            timeout=60)
    for r in results:
        assert r.error == "RuntimeError: device lost during the step", r
        assert not r.finish_reason
    streamed = [r for r in results[1::2] if r.first_token]
    assert streamed and all(0 < len(r.token_ids) < 12 for r in streamed)  # deltas first, then the error
    monkeypatch.setattr(runner, "run", real)
    after = pipe.generate([req("Five", n=5), req("Six", stream=True, n=5)], timeout=60)
    assert [(r.error, r.finish_reason, len(r.token_ids)) for r in after] == [("", "length", 5)] * 2
    assert pipe.engine.thread.is_alive()
