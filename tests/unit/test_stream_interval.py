"""llm parameter stream_interval: a streaming request's records carry that many new tokens, the first
token goes out at once, the last record carries what is left; nothing is lost or reordered; the engine
applies the parameter to every request it admits."""

from __future__ import annotations

import pytest

from tritonvl.handlers.engine.outputs import Responder
from tritonvl.handlers.options import RequestOptions
from tritonvl.handlers.sampling import SamplingParams


def records(interval: int, n: int, stream: bool = True) -> list:
    out = []
    r = Responder(RequestOptions(SamplingParams(max_tokens=n), stream=stream), 5, out.append, out.append)
    r.stream_interval = interval
    for i in range(n - 1):
        r.delta(f"t{i} ", [i])
    r.finish("length", f"t{n - 1} ", [n - 1])
    return out


@pytest.mark.parametrize("interval, sizes", [(1, [1] * 10), (4, [1, 4, 4, 1]), (3, [1, 3, 3, 3]), (16, [1, 9])])
def test_records_carry_interval_tokens_after_the_first(interval, sizes):
    out = records(interval, 10)
    assert [len(r.token_ids) for r in out] == sizes
    assert sum((r.token_ids for r in out), []) == list(range(10))
    assert "".join(r.text for r in out) == "".join(f"t{i} " for i in range(10))
    assert [r.finish_reason for r in out] == [None] * (len(sizes) - 1) + ["length"]
    assert [r.num_output_tokens for r in out] == [sum(sizes[:k + 1]) for k in range(len(sizes))]


def test_a_token_without_text_waits_for_the_next():
    """A token that releases no text yet (part of a UTF-8 character) is held, as with interval 1."""
    out = []
    r = Responder(RequestOptions(SamplingParams(max_tokens=4), stream=True), 5, out.append, out.append)
    r.stream_interval = 2
    r.delta("", [0])
    r.delta("é", [1])
    r.delta("a", [2])
    r.finish("stop", "b", [3])
    assert [(x.text, x.token_ids) for x in out] == [("é", [0, 1]), ("ab", [2, 3])]


def test_not_streaming_is_one_record():
    assert [len(r.token_ids) for r in records(4, 10, stream=False)] == [10]


def test_the_engine_gives_each_request_its_interval(model_dir):
    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    seen = []
    with OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24, stream_interval=5) as pipe:
        real = pipe.engine._add

        def add(job, compiled=None):
            real(job, compiled)
            seen.append(job.responder.stream_interval)

        pipe.engine._add = add
        res = pipe.generate([RawRequest(text_input=b"Count.", stream=True,
                                        sampling={"max_tokens": 6, "temperature": 0.0, "ignore_eos": True})])
    assert seen == [5] and len(res[0].token_ids) == 6
