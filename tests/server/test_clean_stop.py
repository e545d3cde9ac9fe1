"""A server stopped after traffic leaves no crashed stub (issue 30).

One tritonserver of its own serves text, an image, a gRPC stream, a stream that asks for one output
only, and a stream its client cancels; then it gets SIGTERM. No Python-backend stub may crash on the
way down: the server log must hold no "Fatal Python error" (every stub writes one, with the Python
traceback of each thread, when it dies of a signal: adapter.enable_faulthandler), no "Segmentation
fault", no "Signal (11)"/"Signal (6)", and every model must report "successfully unloaded"; the
kernel log (dmesg, where this user may read it) must show no segfault or trap of the server or of
one of its stubs.

Before the fix every stop logged three stub segfaults (`segfault at 60 ... in
triton_python_backend_stub`, in Metric::SaveToSharedMemory: metric families destroyed after the
stub tore down its link to the server), and this test failed on both logs.

The same check after tritonserver is SIGKILLed (it never unloads; the 2.51 stubs tear themselves
down from their health thread): before, one to three stubs crashed there (a core dump showed
~Stub -> ~MetricFamily, then Stub::PopMessage on unmapped shared memory).

``TRITONVL_CLEAN_STOP_REPO`` points it at another model repository (how it was run on the old code).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
from helpers import MODEL, _inputs, infer_http, make_image, stream_grpc, stream_results

MODELS = ("preprocess", "vision_encoder", "llm", "qwen2_5_vl", "qwen2_5_vl_ensemble")
CRASH_LINES = re.compile(r"Fatal Python error|Segmentation fault|Signal \((11|6|7|4|8)\)")


def kernel_log() -> list[str] | None:
    """dmesg's lines, or None when this user may not read them."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines() if out.returncode == 0 and out.stdout else None


def kernel_crashes(lines: list[str], pids: set[int]) -> list[str]:
    """Segfaults and traps the kernel logged for one of ``pids`` ("comm[pid]: segfault at ...")."""
    out = []
    for line in lines:
        m = re.search(r"\[(\d+)\]: (segfault at|trap|general protection)", line) \
            or re.search(r"traps: \S+\[(\d+)\]", line)
        if m and int(m.group(1)) in pids:
            out.append(line)
    return out


def stub_pids(server_pid: int) -> set[int]:
    """The stubs' pids and their threads' ids (the kernel names the thread that faulted)."""
    pids = set()
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            if "triton_python_backend_stub" in " ".join(p.cmdline()[:1]):
                pids.add(p.pid)
                pids.update(t.id for t in p.threads())
        except psutil.NoSuchProcess:
            pass
    return pids


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cancelled_stream(url: str) -> None:
    """A long gRPC stream the client cancels after three responses."""
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), got))
        client.async_stream_infer(MODEL, _inputs(grpcclient, {"text_input": "Tell me a very long story.",
                                                               "max_tokens": 4000, "ignore_eos": True,
                                                               "stream": True}))
        for _ in range(3):
            result, error = got.get(timeout=120)
            assert error is None, error
        client.stop_stream(cancel_requests=True)
    finally:
        client.close()


def one_output_stream(url: str) -> list[str]:
    """A stream that asks for text_output only: the front and llm must send just that."""
    import tritonclient.grpc as grpcclient

    texts = []
    for result in stream_results(url, MODEL, _inputs(grpcclient, {"text_input": "one output", "max_tokens": 6,
                                                                   "stream": True}),
                                 outputs=[grpcclient.InferRequestedOutput("text_output")]):
        names = {o.name for o in result.get_response().outputs}
        assert names <= {"text_output"}, names
        if names:
            texts.append(result.as_numpy("text_output").reshape(-1)[0].decode())
    return texts


@pytest.fixture(scope="module")
def stopped(model_dir, tmp_path_factory):
    """Serve the traffic, stop the server; its log, the kernel log's new lines and the pids."""
    from tritonvl.handlers.tools.launcher import ServerProcess

    before = kernel_log()
    log_path = tmp_path_factory.mktemp("clean_stop") / "tritonserver.log"
    repo = os.environ.get("TRITONVL_CLEAN_STOP_REPO")
    srv = ServerProcess(str(model_dir), repo=Path(repo) if repo else None, log_path=str(log_path)).start()
    try:
        pids = stub_pids(srv.proc.pid) | {srv.proc.pid}
        assert len(pids) >= 6, pids  # server + the stubs of front, preprocess, vision_encoder, llm (+ threads)
        assert infer_http(srv.http_url, text_input="hello", max_tokens=4)["output_ids"]
        image = make_image(64, 48, seed=3)
        assert infer_http(srv.http_url, text_input="What is this?", image=[image], max_tokens=4)["output_ids"]
        assert stream_grpc(srv.grpc_url, text_input="a stream", max_tokens=6, stream=True)
        assert stream_grpc(srv.grpc_url, text_input="an image stream", image=[image], max_tokens=6, stream=True)
        assert one_output_stream(srv.grpc_url)
        cancelled_stream(srv.grpc_url)
        time.sleep(1)  # the cancel reaches llm
        pids |= stub_pids(srv.proc.pid)
    finally:
        code = srv.stop(timeout=90)
    time.sleep(2)  # the kernel's lines for the last stub to exit
    after = kernel_log()
    seen = set(before or ())
    new = None if before is None or after is None else [line for line in after if line not in seen]
    return {"log": log_path.read_text(errors="replace"), "log_path": log_path, "code": code, "kernel": new,
            "pids": pids}


@pytest.fixture(scope="module")
def killed(model_dir, tmp_path_factory):
    """Serve a little, SIGKILL tritonserver; its log (the stubs write to it too) and the kernel log."""
    import signal

    from tritonvl.handlers.tools.launcher import ServerProcess

    before = kernel_log()
    log_path = tmp_path_factory.mktemp("killed") / "tritonserver.log"
    repo = os.environ.get("TRITONVL_CLEAN_STOP_REPO")
    srv = ServerProcess(str(model_dir), repo=Path(repo) if repo else None, log_path=str(log_path)).start()
    try:
        pids = stub_pids(srv.proc.pid)
        image = make_image(64, 48, seed=4)
        assert infer_http(srv.http_url, text_input="What is this?", image=[image], max_tokens=4)["output_ids"]
        assert stream_grpc(srv.grpc_url, text_input="a stream", max_tokens=6, stream=True)
        pids |= stub_pids(srv.proc.pid)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(running(p) for p in pids):
            time.sleep(0.2)
    finally:
        srv.stop()
    time.sleep(2)
    after = kernel_log()
    seen = set(before or ())
    new = None if before is None or after is None else [line for line in after if line not in seen]
    return {"log": log_path.read_text(errors="replace"), "log_path": log_path, "kernel": new, "pids": pids}


def test_server_log_shows_no_stub_crash(stopped):
    log = stopped["log"]
    crashes = [line for line in log.splitlines() if CRASH_LINES.search(line)]
    assert not crashes, f"a stub crashed at stop ({stopped['log_path']}):\n" + "\n".join(crashes[:20])
    for model in MODELS:
        assert f"successfully unloaded '{model}'" in log, model
    assert stopped["code"] == 0, stopped["code"]


def test_kernel_log_shows_no_stub_crash(stopped):
    if stopped["kernel"] is None:
        pytest.skip("the kernel log (dmesg) cannot be read here")
    crashes = kernel_crashes(stopped["kernel"], stopped["pids"])
    assert not crashes, "the kernel saw a stub crash:\n" + "\n".join(crashes)


def test_killed_server_leaves_no_stub_crash(killed):
    crashes = [line for line in killed["log"].splitlines() if CRASH_LINES.search(line)]
    assert not crashes, f"a stub crashed when the server was killed ({killed['log_path']}):\n" + "\n".join(crashes)
    if killed["kernel"] is not None:
        crashes = kernel_crashes(killed["kernel"], killed["pids"])
        assert not crashes, "the kernel saw a stub crash:\n" + "\n".join(crashes)
