"""Tensor parallelism (llm.tensor_parallel_size=2, two gloo ranks on the CPU): greedy output through a
real tritonserver equals transformers' generate() and tensor_parallel_size 1, token for token; the
worker rank dies with its stub (SIGTERM, SIGKILL of the stub or of tritonserver, a failed load); a
rank that raises mid-step ends the requests in flight with an error, nothing hangs. No speed is
claimed on the CPU (handlers/engine/parallel.py, docs/DEVICES.md)."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from family_cases import PARITY
from family_ref import FamilyReference
from helpers import infer_http, make_image, wait_for
from videos import intake, make_video

from tritonvl.handlers.engine.parallel import FAULT_ENV, WORKER_MODULE
from tritonvl.handlers.preprocess.video_rules import VideoLimits

MAX = 10
TP = {"tensor_parallel_size": "2", "drain_deadline_s": "3", "kv_cache_bytes": str(1 << 24)}
VIDEO = {"video_min_pixels": 4 * 28 * 28, "video_max_pixels": 24 * 28 * 28, "video_total_pixels": 96 * 28 * 28}
LIMITS = VideoLimits(max_seconds=600, max_frames=4096, max_bytes=100 << 20, min_pixels=4 * 28 * 28,
                     max_pixels=24 * 28 * 28, total_pixels=96 * 28 * 28)


LLM_ONLY = ["--model-control-mode=explicit", "--load-model=llm"]  # the hygiene tests need no pipeline


def start(model_dir, tmp_path, env=None, extra=None):
    from tritonvl.handlers.tools.launcher import ServerProcess

    return ServerProcess(str(model_dir), log_path=str(tmp_path / "server.log"), env=env, extra=extra,
                         overrides={"llm": TP, "preprocess": VIDEO})


@pytest.fixture(scope="module")
def tp_server(model_dir, tmp_path_factory):
    srv = start(model_dir, tmp_path_factory.mktemp("tp")).start()
    yield srv
    srv.stop(timeout=60)


@pytest.fixture(scope="module")
def ref(reference):
    return reference  # the session's generate() on the test model (tests/conftest.py)


def greedy(**fields):
    return {"temperature": 0.0, "max_tokens": MAX, "exclude_input_in_output": True, **fields}


def cmdline(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def llm_stub(server_pid: int) -> int:
    import psutil

    (pid,) = [p.pid for p in psutil.Process(server_pid).children(recursive=True)
              if "/llm/1/model.py" in cmdline(p)]
    return pid


def workers(server_pid: int) -> list[int]:
    """The tensor-parallel worker processes under the server (by command line)."""
    import psutil

    return [p.pid for p in psutil.Process(server_pid).children(recursive=True)
            if WORKER_MODULE in cmdline(p)]


def gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Every pid has exited (zombies count as exited) within ``timeout`` seconds."""
    import psutil

    def check():
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    return bool(wait_for(check, timeout=timeout, interval=0.2))


# ---- parity -------------------------------------------------------------------------------------


def test_one_worker_rank_runs_under_the_llm_stub(tp_server):
    stub = llm_stub(tp_server.proc.pid)
    (worker,) = workers(tp_server.proc.pid)
    import psutil

    assert psutil.Process(worker).ppid() == stub


def test_worker_log_has_no_torchao_import_noise(tp_server):
    """The worker loads the model too, so it installs handlers/noise.py's filter as the stubs do."""
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed: its import warnings cannot occur")
    log = Path(tp_server.log_path).read_text(errors="replace")
    assert "tp rank 1" in log  # the worker's own lines do reach this log
    assert "/torchao/_C" not in log, [line for line in log.splitlines() if "/torchao/_C" in line][:4]


def test_text_equals_generate_and_tp1(tp_server, ref, server):
    prompt = "Tell me a story about a lighthouse."
    out = infer_http(tp_server.http_url, **greedy(text_input=prompt))
    assert out["output_ids"] == ref.generate(prompt, max_tokens=MAX)
    assert out["output_ids"] == infer_http(server.http_url, **greedy(text_input=prompt))["output_ids"]  # tp 1


@pytest.mark.parametrize("check", PARITY[1:], ids=lambda c: c.__name__)
def test_equals_generate(tp_server, ref, check):
    """an image, two images, a stream (tests/server/family_cases.py; text above, with tp 1)."""
    check(tp_server, ref, MAX)


def test_video_equals_generate(tp_server, model_dir):
    fref = FamilyReference(str(model_dir))
    clip = make_video(n=8, width=112, height=84, fps=8, seed=1)
    out = infer_http(tp_server.http_url, **greedy(text_input="What happens in the video?", video=[clip]))
    want = fref.generate("What happens in the video?", videos=[intake(fref.ip, LIMITS)(clip)], max_tokens=MAX)
    assert out["output_ids"] == want


def test_sixteen_concurrent_requests(tp_server, ref):
    jobs = [(f"Question number {i}?", [make_image(64 + 8 * i, 64, seed=50 + i)] if i % 3 == 0 else [])
            for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda j: infer_http(tp_server.http_url, **greedy(text_input=j[0], image=j[1])), jobs))
    for (text, images), out in zip(jobs, outs):
        assert out["output_ids"] == ref.generate(text, images, max_tokens=MAX), text


def test_sigterm_with_streams_in_flight_leaves_no_worker(tp_server):
    """Last test of the module's server: SIGTERM while streams run; they end (drained), the server
    exits 0 and the worker rank is gone."""
    from test_faults import drain, open_stream

    pids = workers(tp_server.proc.pid) + [llm_stub(tp_server.proc.pid)]
    streams = [open_stream(tp_server.grpc_url, text_input=f"long {i}", max_tokens=4000, ignore_eos=True,
                           temperature=0.0, stream=True) for i in range(2)]
    for _, got in streams:
        got.put(got.get(timeout=60))
    tp_server.proc.send_signal(signal.SIGTERM)
    for client, got in streams:
        responses, error = drain(got, timeout=60)
        client.stop_stream()
        assert error is None and responses, error
    assert tp_server.proc.wait(timeout=40) == 0
    assert gone(pids)


# ---- hygiene: own servers -----------------------------------------------------------------------


def test_sigkill_of_the_llm_stub_leaves_no_worker(model_dir, tmp_path):
    with start(model_dir, tmp_path, extra=LLM_ONLY) as srv:
        pids = workers(srv.proc.pid)
        assert len(pids) == 1
        os.kill(llm_stub(srv.proc.pid), signal.SIGKILL)
        assert gone(pids), "the worker outlived its stub by 10 s"


def test_sigkill_of_tritonserver_leaves_no_process(model_dir, tmp_path):
    import psutil

    srv = start(model_dir, tmp_path, extra=LLM_ONLY).start()
    try:
        pids = workers(srv.proc.pid) + [p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True)]
        assert len(workers(srv.proc.pid)) == 1
        srv.proc.kill()
        srv.proc.wait(10)
        assert gone(pids), "a stub or worker outlived tritonserver by 10 s"
    finally:
        srv.stop(timeout=30)


def test_load_that_fails_on_rank_1_leaves_no_process(model_dir, tmp_path):
    import psutil

    before = {p.pid for p in psutil.process_iter() if WORKER_MODULE in cmdline(p)}
    srv = start(model_dir, tmp_path, env={FAULT_ENV: "load:1"}, extra=LLM_ONLY)
    with pytest.raises(Exception):  # noqa: B017 (whatever start() raises; the log below names the cause)
        srv.start()
    srv.stop(timeout=30)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "injected fault on rank 1 (load)" in log, log[-3000:]

    def leftovers():
        return [p.pid for p in psutil.process_iter()
                if WORKER_MODULE in cmdline(p) and p.pid not in before]

    assert wait_for(lambda: not leftovers(), timeout=10), leftovers()


def test_rank_that_raises_mid_step_fails_requests_without_a_hang(model_dir, tmp_path):
    """Rank 1 raises in its 3rd forward: the request in flight ends with UNAVAILABLE naming the
    fault; later requests are refused the same way at once; the server stays up; no worker left."""
    with start(model_dir, tmp_path, env={FAULT_ENV: "step:1:3"}) as srv:
        pids = workers(srv.proc.pid)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"UNAVAILABLE\] tensor-parallel step failed.*injected fault on rank 1"):
            infer_http(srv.http_url, **greedy(text_input="This fails on step three."))
        assert time.monotonic() - t0 < 30
        with pytest.raises(RuntimeError, match=r"UNAVAILABLE\] tensor-parallel step failed"):
            infer_http(srv.http_url, **greedy(text_input="And so does this one."))
        assert gone(pids)
        import requests

        assert requests.get(f"http://{srv.http_url}/v2/health/live", timeout=5).status_code == 200
