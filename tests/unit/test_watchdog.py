"""The stub watchdog: a sibling that dies unregistered stops the server; a clean unload does not; a
reused server pid does not inherit a dead server's registrations; an orphaned stub exits; the
server's shutdown is noticed."""

import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tritonvl.handlers.tritonserver.watchdog import Watchdog, start_time


def wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def register(dog: Watchdog, name: str, pid: int) -> Path:
    f = dog.dir / f"{name}.{pid}.{start_time(pid)}"
    f.write_text(str(pid))
    return f


def test_dead_sibling_stops_the_server():
    server = subprocess.Popen(["sleep", "60"])
    sibling = subprocess.Popen(["sleep", "60"])
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, grace_seconds=2)
    register(dog, "b", sibling.pid)
    time.sleep(0.3)
    assert server.poll() is None  # everyone alive: nothing happens
    sibling.kill()
    sibling.wait()
    assert wait(lambda: server.poll() is not None)
    dog.stop()


def test_clean_unload_is_not_a_crash():
    server = subprocess.Popen(["sleep", "60"])
    sibling = subprocess.Popen(["sleep", "60"])
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, grace_seconds=2)
    register(dog, "b", sibling.pid).unlink()  # what the sibling's finalize does first (Watchdog.stop)
    sibling.kill()
    sibling.wait()
    time.sleep(0.5)
    assert server.poll() is None
    dog.stop()
    server.kill()


def test_registrations_left_by_a_dead_server_with_the_same_pid_are_ignored():
    """Issue 19: registries were keyed by the server pid alone, so a new server that got the pid of
    a dead one (whose stubs never unregistered) was stopped by its own watchdogs."""
    server = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = Path(tempfile.gettempdir())
    stale = [tmp / f"tritonvl-stubs-{server.pid}", tmp / f"tritonvl-stubs-{server.pid}-1"]  # old and new naming
    for d in stale:
        d.mkdir(exist_ok=True)
        (d / f"llm.{dead.pid}").write_text(str(dead.pid))
        (d / f"llm.{dead.pid}.1").write_text(str(dead.pid))
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, grace_seconds=2)
    time.sleep(0.5)
    assert server.poll() is None, "the new server was stopped for a dead server's stub"
    assert not any(d.exists() for d in stale)  # dead servers' registries are cleaned up
    dog.stop()
    server.kill()


ORPHAN = """
import subprocess, sys, time
code = ("import time; from tritonvl.handlers.tritonserver.watchdog import Watchdog; "
        "Watchdog('stub', interval=0.1, check_siblings=False); print('up', flush=True); time.sleep(60)")
stub = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE)
print(stub.pid, flush=True)
stub.stdout.readline()
print('ready', flush=True)
time.sleep(60)
"""


def test_a_stub_whose_server_was_killed_exits():
    server = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True)
    stub_pid = int(server.stdout.readline())
    assert server.stdout.readline().strip() == "ready"
    server.kill()  # SIGKILL: the stub is re-parented
    server.wait()
    assert wait(lambda: start_time(stub_pid) is None or not Path(f"/proc/{stub_pid}").exists()
                or open(f"/proc/{stub_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", timeout=5)


def test_server_shutdown_is_noticed_once():
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--http-port={port}"])
    calls = []
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, on_shutdown=lambda: calls.append(1))
    assert wait(lambda: dog._seen_ready, timeout=5)
    assert calls == []
    httpd.shutdown()
    httpd.server_close()  # the port refuses connections, as tritonserver's does on SIGTERM
    assert wait(lambda: calls == [1], timeout=5)
    time.sleep(0.3)
    assert calls == [1]
    dog.stop()
    server.kill()


def test_shutdown_right_after_start_is_noticed_once_a_request_came():
    """SIGTERM before the first ready probe: the model's first request says the server was up."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: tritonserver's HTTP port after SIGTERM
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--http-port={port}"])
    calls = []
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, on_shutdown=lambda: calls.append(1))
    time.sleep(0.3)
    assert calls == []  # not up yet: starting, not stopping
    dog.serving()
    assert wait(lambda: calls == [1], timeout=5)
    dog.stop()
    server.kill()


def test_a_ready_probe_that_times_out_is_not_a_shutdown(monkeypatch):
    """On a loaded machine the server may answer its ready probe late: that must never start a drain
    (seen: a benchmark's server drained under load). Only a refused port or a non-200 answer counts."""
    import socket

    from tritonvl.handlers.tritonserver import watchdog as wd

    listener = socket.socket()  # accepts connections (the kernel's backlog) but never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    monkeypatch.setattr(wd, "_ready", lambda url, timeout=0.2, _f=wd._ready: _f(url, timeout))
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--http-port={port}"])
    calls = []
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, on_shutdown=lambda: calls.append(1))
    dog.serving()  # the server was up
    time.sleep(1.5)  # several probes, each timing out
    assert calls == []
    listener.close()  # now the port refuses: that is a shutdown
    assert wait(lambda: calls == [1], timeout=5)
    dog.stop()
    server.kill()


def test_monitor_kills_a_stub_that_cannot_exit_when_the_server_is_gone():
    """The shell backstop: a "stub" that ignores SIGTERM and never checks anything (as one whose
    threads are stuck behind the GIL) is SIGKILLed within seconds of its server's death; a stub
    that ends by itself takes its monitor with it."""
    import signal as _signal
    import subprocess
    import sys

    from tritonvl.handlers.tritonserver.watchdog import MONITOR

    stub = ("import os, signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"m = subprocess.Popen(['sh', '-c', {MONITOR!r}, 'mon', str(os.getppid()), str(os.getpid())])\n"
            "print(os.getpid(), m.pid, flush=True)\n"
            "time.sleep(float(sys.argv[1]))\n")
    server_code = ("import subprocess, sys, time\n"
                   f"subprocess.Popen([sys.executable, '-c', {stub!r}, sys.argv[1]], stdout=sys.stdout)\n"
                   "time.sleep(120)\n")

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except OSError:
            return True

    def wait_gone(pid: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return gone(pid)

    pids = []
    try:
        server = subprocess.Popen([sys.executable, "-c", server_code, "120"], stdout=subprocess.PIPE, text=True)
        stub, monitor = map(int, server.stdout.readline().split())
        pids += [stub, monitor]
        time.sleep(1.5)
        assert not gone(stub) and not gone(monitor)
        server.kill()
        server.wait()
        assert wait_gone(stub, 10), "the stub outlived its server"
        assert wait_gone(monitor, 5)
        # a stub that ends on its own: its monitor ends too (and kills nothing)
        server = subprocess.Popen([sys.executable, "-c", server_code, "1"], stdout=subprocess.PIPE, text=True)
        stub, monitor = map(int, server.stdout.readline().split())
        pids += [stub, monitor]
        assert wait_gone(stub, 10) and wait_gone(monitor, 5)
        assert server.poll() is None  # the server lives on
    finally:
        for proc in (server,):
            proc.kill()
            proc.wait()
        for pid in pids:
            try:
                os.kill(pid, _signal.SIGKILL)
            except OSError:
                pass
