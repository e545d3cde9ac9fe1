"""TextStream / Generation over a fake transport, error mapping, progress and batch planning (no server)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from tritonvl.client.batch import plan, read_done
from tritonvl.client.errors import InvalidRequest, ModelNotFound, RequestFailed, RequestTimeout, classify
from tritonvl.client.images import ImageOptions
from tritonvl.client.params import SamplingParams
from tritonvl.client.parsing import StopRules
from tritonvl.client.progress import Progress
from tritonvl.client.request import build_request
from tritonvl.client.stream import Cancelled, CancelToken, Chunk, Generation, TextStream


def make_stream(chunks, stream=True, **params):
    """A TextStream over ``chunks``; returns it and a record of whether the transport was closed early."""
    state = {"closed_early": False, "sent": 0}
    token = CancelToken()

    def transport():
        done = False
        try:
            for c in chunks:
                if isinstance(c, Exception):
                    raise c
                state["sent"] += 1
                done = c.final
                yield c
        finally:
            state["closed_early"] = not done

    request = build_request("hi", None, None, SamplingParams.from_kwargs(**params), stream, ImageOptions())
    return TextStream(transport(), Generation(request, StopRules()), token.cancel), state


def test_deltas_and_result():
    s, state = make_stream([Chunk("a", [1], input_tokens=5, output_tokens=1),
                            Chunk("b", [2], "length", 5, 2, final=True)])
    assert list(s) == ["a", "b"]
    r = s.result
    assert (r.text, r.finish_reason, r.output_ids) == ("ab", "length", [1, 2])
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (5, 2, 7)
    assert r.ttft is not None and r.latency >= r.ttft
    assert not state["closed_early"]


def test_client_side_stop_closes_the_transport():
    """A server that ignores the stop: the client cuts, reports "stop" and stops reading (cancels)."""
    s, state = make_stream([Chunk("x", [1]), Chunk("<|im_end|>", [151645]), Chunk("junk", [3]),
                            Chunk("", [], "length", final=True)])
    assert "".join(s) == "x"
    assert s.result.finish_reason == "stop" and s.result.stop == 151645
    assert state["closed_early"] and state["sent"] == 2


def test_held_back_stop_prefix_is_released_at_the_end():
    s, _ = make_stream([Chunk("ab", [1]), Chunk("S", [2], "length", final=True)], stop=["ST"])
    assert list(s) == ["ab", "S"]
    assert s.result.finish_reason == "length"


def test_cancel_gives_a_cancelled_result():
    s, _ = make_stream([Chunk("a", [1]), Cancelled()])
    assert list(s) == ["a"]
    assert s.result.finish_reason == "cancelled" and s.result.text == "a"


def test_break_cancels():
    s, state = make_stream([Chunk("a", [1]), Chunk("b", [2]), Chunk("c", [3], "length", final=True)])
    with s:
        for _ in s:
            break
    assert state["closed_early"]
    assert s.result.finish_reason == "cancelled"


def test_errors_propagate():
    s, _ = make_stream([Chunk("a", [1]), InvalidRequest("top_p=3.0: must be in (0, 1]")])
    with pytest.raises(InvalidRequest):
        list(s)


def test_non_streaming_has_no_ttft():
    s, _ = make_stream([Chunk("abc", [1, 2], "length", final=True)], stream=False)
    assert s.until_done().ttft is None


@pytest.mark.parametrize("message,status,kind", [
    ("in ensemble 'qwen2_5_vl', top_p=3.0: must be in (0, 1]", 400, InvalidRequest),
    ("[StatusCode.INVALID_ARGUMENT] image[0]: bad", "StatusCode.INVALID_ARGUMENT", InvalidRequest),
    ("Request for unknown model: 'nosuch' is not found", 404, ModelNotFound),
    ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", RequestTimeout),
    ("internal error: RuntimeError: boom", 500, RequestFailed),
])
def test_classify(message, status, kind):
    err = classify(message, status)
    assert type(err) is kind
    assert not str(err).startswith("in ensemble") and not str(err).startswith("[StatusCode")


def test_progress_line():
    out = io.StringIO()
    p = Progress(4, stream=out, interval=0)
    p.update()
    p.update(error=True)
    line = out.getvalue().splitlines()[-1]
    assert "2/4" in line and "1 err" in line and "img/s" in line and "ETA" in line


def test_batch_plan_and_resume(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.webp"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "a.png", "text": "t"}) + "\n" + json.dumps({"path": "b.jpg", "error": "e"})
                   + "\n" + '{"path": "sub/c.we')  # a run killed mid-line
    assert read_done(out) == {"a.png": False, "b.jpg": True}
    todo, skipped = plan(tmp_path / "imgs", out, retry_errors=False)
    assert [k for k, _ in todo] == ["sub/c.webp"] and skipped == 2
    todo, skipped = plan(tmp_path / "imgs", out, retry_errors=True)
    assert [k for k, _ in todo] == ["b.jpg", "sub/c.webp"] and skipped == 1


def test_the_client_imports_without_torch_or_the_server_package():
    code = ("import sys, tritonvl.client, tritonvl.client.cli, tritonvl.client.batch;"
            "bad = [m for m in ('torch', 'transformers', 'tritonvl.handlers') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
