"""Stopping the server (docs/INTERFACE.md, Shutdown), two servers in a row:

1. `tritonvl serve` gets SIGTERM with four 4,000-token streams in flight: the streams keep getting
   responses after the signal, each ends with a final response (finish_reason `cancelled` once the
   drain deadline passes), every process is gone within the exit timeout, nothing aborts.
2. A plain tritonserver that reuses the first one's pid, with stale stub registrations planted for
   that pid, is not stopped by its own watchdogs (issue 19); killed with SIGKILL, it leaves no stub
   behind after 10 s. Starting a server with a given pid needs root (it writes ns_last_pid), so
   this one skips elsewhere.
3. A plain tritonserver killed with SIGKILL leaves no stub and no stub monitor behind after 10 s
   (docs/CANCELLATION.md): runs everywhere.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
import requests
from helpers import MODEL, _inputs, _result, proc_info

EXIT_TIMEOUT = 30  # what the launcher passes to tritonserver
DRAIN = 4  # llm drain_deadline_s for this test (default 20)


def ready(http_url: str) -> bool:
    try:
        return requests.get(f"http://{http_url}/v2/health/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def aborts(log: str) -> list[str]:
    """Signals that kill tritonserver (its "Signal (15) received." on SIGTERM is the normal stop)."""
    return [m for m in re.findall(r"Signal \((\d+)\)", log) if m not in ("2", "15")]


class Stream:
    """One gRPC stream read in the background: (arrival time, response dict, final flag) per response."""

    def __init__(self, grpc_url: str, i: int) -> None:
        import tritonclient.grpc as grpcclient

        self.got: queue.Queue = queue.Queue()
        self.responses: list[tuple[float, dict, bool]] = []
        self.error = None
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), self.got))
        fields = {"text_input": f"Tell me a very long story, number {i}.", "max_tokens": 4000, "ignore_eos": True,
                  "temperature": 0.0, "stream": True}
        self.client.async_stream_infer(MODEL, _inputs(grpcclient, fields), enable_empty_final_response=True)
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                result, error = self.got.get(timeout=120)
                if error is not None:
                    self.error = error
                    return
                final = result.get_response().parameters.get("triton_final_response")
                final = bool(final is not None and final.bool_param)
                self.responses.append((time.monotonic(), _result(result), final))
                self.first.set()
                if final:
                    return
        except queue.Empty:
            self.error = "no response for 120 s"
        finally:
            self.client.stop_stream()  # a client closes its stream when done (an open one holds Triton's exit)

    @property
    def finish_reason(self) -> str | None:
        return next((r.get("finish_reason") for _, r, final in self.responses if final), None)


@pytest.fixture(scope="module")
def first_pid() -> dict:
    return {}


def test_sigterm_under_tritonvl_serve_drains_then_ends_every_stream(model_dir, tmp_path, first_pid):
    from tritonvl.handlers.tools.launcher import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [shutil.which("tritonvl") or "tritonvl", "serve", "--model", str(model_dir), "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--set", f"llm.drain_deadline_s={DRAIN}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ready(f"localhost:{http}"):
            assert serve.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        procs = tree(serve.pid)
        first_pid["pid"] = next(p.pid for p in procs if proc_info(p) == "tritonserver")
        streams = [Stream(f"localhost:{grpc}", i) for i in range(4)]
        for s in streams:
            assert s.first.wait(120), s.error
        signalled = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        for s in streams:
            s.thread.join(EXIT_TIMEOUT)
        while alive(procs) and time.monotonic() - signalled < EXIT_TIMEOUT:
            time.sleep(0.2)
        gone_after = time.monotonic() - signalled
        left = alive(procs)
    finally:
        if serve.poll() is None:
            for p in alive(tree(serve.pid)):
                p.kill()
    log = log_path.read_text(errors="replace")
    assert not left, f"still running {EXIT_TIMEOUT} s after SIGTERM: {[p.pid for p in left]}\n" + log[-3000:]
    assert not aborts(log), log[-3000:]
    assert serve.returncode == 0, log[-3000:]
    for s in streams:
        assert s.error is None, s.error
        assert s.responses and s.responses[-1][2], "the stream did not end with a final response"
        after = [r for t, r, _ in s.responses if t > signalled and r.get("output_ids")]
        assert len(after) > 2, "no tokens arrived after the signal: nothing was drained"
        assert s.finish_reason == "cancelled"  # 4,000 tokens do not fit in the drain deadline
        assert s.responses[-1][0] - signalled < DRAIN + 3
    print(f"all processes gone {gone_after:.1f} s after SIGTERM")


def plant_stale_registrations(pid: int) -> list[Path]:
    """What a dead server with this pid left behind: registries (old pid-only naming, and pid + some
    other start time) holding a stub that died without unregistering."""
    # A pid no process can have: a real dead pid may be handed out again to the new server's stubs
    # (pids restart from the forced one), which would make the stale registration look alive.
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    tmp = Path(tempfile.gettempdir())
    dirs = [tmp / f"tritonvl-stubs-{pid}", tmp / f"tritonvl-stubs-{pid}-1"]
    for d in dirs:
        d.mkdir(exist_ok=True)
        (d / f"llm.{dead}").write_text(str(dead))
        (d / f"llm.{dead}.1").write_text(str(dead))
    return dirs


def start_with_pid(srv, pid: int) -> bool:
    """Start ``srv`` so that tritonserver gets ``pid`` (needs root: /proc/sys/kernel/ns_last_pid)."""
    knob = Path("/proc/sys/kernel/ns_last_pid")
    if not os.access(knob, os.W_OK):
        return False
    real_popen = subprocess.Popen

    def popen(cmd, **kw):
        knob.write_text(str(pid - 1))
        return real_popen(cmd, **kw)

    subprocess.Popen = popen
    try:
        srv.start()
    finally:
        subprocess.Popen = real_popen
    return srv.proc.pid == pid


def test_reused_pid_then_sigkill(model_dir, tmp_path, first_pid):
    from tritonvl.handlers.tools.launcher import ServerProcess

    pid = first_pid.get("pid")
    if pid is None:  # run alone: the pid of any process that is gone
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid = gone.pid
    plant_stale_registrations(pid)
    srv = ServerProcess(str(model_dir), log_path=str(tmp_path / "server.log"))
    for _ in range(3):  # another process may take the pid between the write and the fork
        if start_with_pid(srv, pid):
            break
        srv.stop()
    else:
        pytest.skip("could not start tritonserver with a given pid (not root, or the pid was taken)")
    try:
        # Again now: other servers' stubs delete registries of dead servers when they start, so the
        # ones planted before the start may be gone already (the new server's own stubs do too).
        plant_stale_registrations(pid)
        time.sleep(5)  # the watchdogs check every second
        assert srv.proc.poll() is None and ready(srv.http_url), "stopped by a dead server's registrations\n" \
            + srv.log_tail()
        stubs = sigkill_leaves_nothing(srv)
    finally:
        srv.stop()
        for p in alive(stubs if "stubs" in locals() else []):
            p.kill()


def command(p: psutil.Process) -> str | None:
    try:
        return " ".join(p.cmdline())
    except (psutil.Error, OSError):  # exited meanwhile
        return None


ORPHAN_LIMIT = 10  # s; the code's own bound is ~4 s (watchdog.py: the monitor polls each 1 s, then waits 3 s)


def sigkill_leaves_nothing(srv) -> list[psutil.Process]:
    """SIGKILL the running server ``srv``; assert every process under it (the stubs and their
    monitors) is gone within ORPHAN_LIMIT. Returns them (for a last-resort kill by the caller)."""
    procs = tree(srv.proc.pid)[1:]
    cmds = {p: command(p) for p in procs}  # the monitors' `sleep 1` children come and go: may be None
    stubs = [p for p, cmd in cmds.items() if cmd and "triton_python_backend_stub" in cmd]
    assert len(stubs) >= 4, cmds  # preprocess, vision_encoder, llm, qwen2_5_vl
    assert any(cmd and "tritonvl-stub-monitor" in cmd for cmd in cmds.values()), cmds
    srv.proc.kill()  # SIGKILL: Triton cannot stop its stubs
    srv.proc.wait()
    killed = time.monotonic()
    stubs_gone = None
    while alive(procs) and time.monotonic() - killed < ORPHAN_LIMIT:
        if stubs_gone is None and not alive(stubs):
            stubs_gone = time.monotonic() - killed
        time.sleep(0.1)
    left = alive(procs)
    assert not left, f"left {ORPHAN_LIMIT} s after SIGKILL: {[(p.pid, command(p)) for p in left]}"
    print(f"stubs gone {stubs_gone or time.monotonic() - killed:.1f} s after SIGKILL, "
          f"their monitors {time.monotonic() - killed:.1f} s")
    return procs


def test_sigkill_leaves_no_stub_or_monitor(model_dir, tmp_path):
    from tritonvl.handlers.tools.launcher import ServerProcess

    srv = ServerProcess(str(model_dir), log_path=str(tmp_path / "server.log"))
    procs: list[psutil.Process] = []
    try:
        srv.start()
        assert ready(srv.http_url), srv.log_tail()
        procs = tree(srv.proc.pid)[1:]
        sigkill_leaves_nothing(srv)
    finally:
        srv.stop()
        for p in alive(procs):
            p.kill()
