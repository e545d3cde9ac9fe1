"""Faults: SIGTERM drains in-flight streams to a deadline; a killed stub is seen (not ready) and does not hang streams."""

from __future__ import annotations

import os
import queue
import re
import signal
import time
from functools import partial

import pytest
import requests
from helpers import MODEL, _inputs

DRAIN = 3  # llm drain_deadline_s here (default 20): 4,000-token streams cannot finish within it


@pytest.fixture
def own_server(model_dir, tmp_path):
    from tritonvl.handlers.tools.launcher import ServerProcess

    srv = ServerProcess(str(model_dir), log_path=str(tmp_path / "server.log"),
                        overrides={"llm": {"drain_deadline_s": str(DRAIN)}}).start()
    yield srv
    srv.stop(timeout=60)


def open_stream(url: str, **fields):
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), got))
    client.async_stream_infer(MODEL, _inputs(grpcclient, fields), enable_empty_final_response=True)
    return client, got


def drain(got: queue.Queue, timeout: float) -> tuple[list, Exception | None]:
    """Responses until the final one, or the first error; raises queue.Empty on a hang."""
    out = []
    while True:
        result, error = got.get(timeout=timeout)
        if error is not None:
            return out, error
        out.append(result)
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            return out, None


def test_sigterm_drains_in_flight_streams_then_ends_them(own_server):
    """Plain tritonserver (the container's way), SIGTERM with three long streams in flight: they keep
    getting tokens after the signal, until the drain deadline ends them with a final `cancelled`
    response; the server exits cleanly well inside its exit timeout. (`tritonvl serve`:
    tests/server/test_shutdown.py.)"""
    streams = [open_stream(own_server.grpc_url, text_input=f"long answer {i}", max_tokens=4000, ignore_eos=True,
                           temperature=0.0, stream=True) for i in range(3)]
    for _, got in streams:
        got.put(got.get(timeout=60))  # each stream has started
    signalled = time.monotonic()
    own_server.proc.send_signal(signal.SIGTERM)
    for client, got in streams:
        responses, error = drain(got, timeout=60)
        ended = time.monotonic()
        assert error is None, error
        client.stop_stream()  # as clients do once a stream ends (an open stream holds Triton's exit)
        tokens = [r.as_numpy("output_ids").size for r in responses if r.as_numpy("output_ids") is not None]
        assert sum(tokens) > 10, "too few tokens arrived: the drain did not run with work pending"
        assert responses[-1].as_numpy("finish_reason").reshape(-1)[0] == b"cancelled"
        assert ended - signalled < DRAIN + 5
    assert own_server.proc.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 30  # tritonserver's exit timeout: it never had to abort
    log = own_server.log_tail(200_000)
    assert not [s for s in re.findall(r"Signal \((\d+)\)", log) if s != "15"], log[-3000:]


def stub_pids(server_pid: int, model: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(server_pid).children(recursive=True)
            if f"/{model}/1/model.py" in " ".join(p.cmdline())]


def ready(server) -> bool:
    try:
        return requests.get(f"http://{server.http_url}/v2/health/ready", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_killed_llm_stub_means_not_ready_and_erroring_streams(own_server):
    """Triton 2.51 alone keeps reporting ready and leaves the stub's streams open forever; the
    watchdog of the surviving stubs stops the server so that both end (handlers/watchdog.py)."""
    client, got = open_stream(own_server.grpc_url, text_input="long", max_tokens=3000, ignore_eos=True,
                              temperature=0.0, stream=True)
    got.put(got.get(timeout=60))
    (pid,) = stub_pids(own_server.proc.pid, "llm")
    os.kill(pid, signal.SIGKILL)
    responses, error = drain(got, timeout=90)  # queue.Empty here would be a hang
    assert error is not None
    client.stop_stream()
    deadline = time.monotonic() + 30
    while ready(own_server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ready(own_server)
    own_server.proc.wait(timeout=120)  # the server went away: the orchestrator restarts it
