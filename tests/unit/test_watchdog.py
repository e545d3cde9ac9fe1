"""The stub watchdog: a sibling that dies unregistered stops the server; a clean unload does not; a
reused server pid does not inherit a dead server's registrations; an orphaned stub exits; the
server's shutdown is noticed; and only a real one (issue 24): no proxy on the probe's way, the
address and port the server was started with, a model not ready is no stop, a mistaken drain is
taken back (watchdog, front and engine)."""

import http.server
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tritonvl.handlers.tritonserver import watchdog as wd
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


def sleeper(*args: str) -> subprocess.Popen:
    """A stand-in "tritonserver": a sleeping process whose command line carries ``args``, returned
    once that command line reads back (right after exec /proc/<pid>/cmdline can read empty)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])
    wait(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().count(b"\0") >= 3 + len(args), timeout=5)
    return proc


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
    server = sleeper(f"--http-port={port}")
    calls = []
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, on_shutdown=lambda: calls.append(1))
    assert wait(lambda: dog.seen_up, timeout=5)
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
    server = sleeper(f"--http-port={port}")
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
    monkeypatch.setattr(wd, "probe", lambda ep, pid=None, timeout=0.2, _f=wd.probe: _f(ep, pid, timeout))
    server = sleeper(f"--http-port={port}")
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


# ---- issue 24: the watchdog sees only real shutdowns ----

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


class FakeTriton:
    """``/v2/health/ready`` answering ``status`` (settable) at an IPv4/IPv6 address or a unix path, as
    tritonserver's HTTP service does; ``close()`` closes the port (what SIGTERM does to it) and
    ``open()`` listens again on the same one."""

    def __init__(self, host: str = "127.0.0.1", status: int = 200, path: str | None = None) -> None:
        self.status, self.host, self.path, self.port, self.probes = status, host, path, 0, 0
        self.httpd = None
        self.open()

    def open(self) -> None:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                fake.probes += 1
                self.send_response(fake.status if self.path == "/v2/health/ready" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        if self.path:
            class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
                daemon_threads = True

            self.httpd = Server(self.path, Handler)
        else:
            class Server(http.server.ThreadingHTTPServer):
                address_family = socket.AF_INET6 if ":" in fake.host else socket.AF_INET

            self.httpd = Server((self.host, self.port), Handler)
            self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
            if self.path:
                Path(self.path).unlink(missing_ok=True)


class Dog:
    """A Watchdog of a fake "tritonserver" (a sleeping process whose command line carries ``args``);
    ``events`` records "drain" and "resume"."""

    def __init__(self, *args: str) -> None:
        self.server = sleeper(*args)
        self.events: list[str] = []
        self.dog = Watchdog("a", server_pid=self.server.pid, interval=0.05, check_siblings=False,
                            on_shutdown=lambda: self.events.append("drain"),
                            on_resume=lambda: self.events.append("resume"))

    def __enter__(self) -> "Dog":
        return self

    def __exit__(self, *exc) -> None:
        self.dog.stop()
        self.server.kill()
        self.server.wait()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def other_addresses() -> list[tuple[str, str]]:
    """(--http-address value, address to listen on) for addresses of this machine other than
    127.0.0.1: another loopback address, and its non-loopback IPv4 and IPv6 addresses if it has any."""
    found = [("127.0.0.2", "127.0.0.2")]
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    v4 = next((a for a in out if "." in a and not a.startswith("127.")), None)
    v6 = next((a for a in out if ":" in a and not a.lower().startswith("fe80")), None)
    if v4:
        found.append((v4, v4))
    if v6:
        found.append((f"ipv6:{v6}", v6))
    return found


@pytest.mark.parametrize("opts, expected", [
    ({}, (socket.AF_INET, "127.0.0.1", 8000)),
    ({"http-port": "8123"}, (socket.AF_INET, "127.0.0.1", 8123)),
    ({"http-address": "0.0.0.0", "http-port": "9"}, (socket.AF_INET, "127.0.0.1", 9)),
    ({"http-address": "192.0.2.7", "http-port": "9"}, (socket.AF_INET, "192.0.2.7", 9)),
    ({"http-address": "ipv4:10.1.2.3", "http-port": "9"}, (socket.AF_INET, "10.1.2.3", 9)),
    ({"http-address": "ipv6:::", "http-port": "9"}, (socket.AF_INET6, "::1", 9)),
    ({"http-address": "ipv6:fd00::2", "http-port": "9"}, (socket.AF_INET6, "fd00::2", 9)),
    ({"http-address": "::", "http-port": "9"}, (socket.AF_INET6, "::1", 9)),
    ({"http-address": "[fd00::2]", "http-port": "9"}, (socket.AF_INET6, "fd00::2", 9)),
    ({"http-address": "unix:/run/triton.sock"}, (socket.AF_UNIX, "/run/triton.sock", 0)),
    ({"http-address": "localhost", "http-port": "9"}, (socket.AF_UNSPEC, "localhost", 9)),
    ({"allow-http": "false"}, None),
    ({"http-port": "x"}, None),
])
def test_the_endpoint_comes_from_the_servers_own_options(opts, expected):
    ep = wd.http_endpoint(opts)
    assert (ep and (ep.family, ep.host, ep.port)) == expected


def test_server_options_read_both_spellings():
    server = sleeper("--http-port", "1234", "--http-address=192.0.2.9", "--allow-http=true")
    try:
        opts = wd.server_options(server.pid)
        assert (opts["http-port"], opts["http-address"]) == ("1234", "192.0.2.9")
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("seen_up, draining, result, action", [
    (True, False, wd.GONE, "drain"),
    (False, False, wd.GONE, None),  # still starting
    (True, False, wd.NOT_READY, None),  # a model loading or not ready: the server is up
    (True, False, wd.UNKNOWN, None),  # no answer in time: says nothing
    (True, False, wd.READY, None),
    (True, True, wd.READY, "resume"),
    (True, True, wd.NOT_READY, "resume"),  # any answer: the port was never closed
    (True, True, wd.GONE, None),
    (True, True, wd.UNKNOWN, None),
])
def test_decide(seen_up, draining, result, action):
    assert wd.decide(seen_up, draining, result) == action


def test_a_proxy_in_the_environment_does_not_route_the_probe(monkeypatch):
    """Issue 24: urllib sent the stub's probe of 127.0.0.1 to http_proxy; a dead proxy refused it and
    the stub drained a healthy server four seconds after its first request."""
    dead = closed_port()
    for var in PROXY_VARS:
        monkeypatch.setenv(var, f"http://127.0.0.1:{dead}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # urllib builds its default opener, proxies read from the environment, on first use and keeps it:
    # forget one built by an earlier test, so that urllib here sees the proxy as a stub's does
    import urllib.request

    monkeypatch.setattr(urllib.request, "_opener", None)
    fake = FakeTriton()
    try:
        with Dog(f"--http-port={fake.port}") as d:
            assert wait(lambda: d.dog.seen_up, timeout=5), "the probe never reached the server"
            d.dog.serving()
            time.sleep(1.0)
            assert d.events == [] and fake.probes > 3
    finally:
        fake.close()


@pytest.mark.parametrize("address, listen", other_addresses())
def test_probes_the_address_the_server_listens_on(address, listen):
    """--http-address off 127.0.0.1: the probe goes there (it sees the server up by itself), and the
    port closing there is still a shutdown."""
    try:
        fake = FakeTriton(listen)
    except OSError as exc:
        pytest.skip(f"cannot listen on {listen}: {exc}")
    try:
        with Dog(f"--http-address={address}", f"--http-port={fake.port}") as d:
            assert wait(lambda: d.dog.seen_up, timeout=5), f"the probe never reached {listen}"
            d.dog.serving()
            time.sleep(0.5)
            assert d.events == []
            fake.close()
            assert wait(lambda: d.events == ["drain"], timeout=5)
    finally:
        fake.close()


def test_a_unix_socket_address_is_probed(tmp_path):
    fake = FakeTriton(path=str(tmp_path / "triton.sock"))
    try:
        with Dog(f"--http-address=unix:{fake.path}") as d:
            assert wait(lambda: d.dog.seen_up, timeout=5)
            fake.close()
            assert wait(lambda: d.events == ["drain"], timeout=5)
    finally:
        fake.close()


def test_a_model_not_ready_is_not_a_shutdown():
    """tritonserver answers 400 on /v2/health/ready while a model loads or unloads (seen on 2.51 in
    explicit mode) and 503 may come from a proxy in front: neither starts a drain."""
    fake = FakeTriton(status=400)
    try:
        with Dog(f"--http-port={fake.port}") as d:
            d.dog.serving()
            time.sleep(0.6)
            fake.status = 503
            time.sleep(0.6)
            fake.status = 200
            time.sleep(0.3)
            assert d.events == [] and d.dog.seen_up and not d.dog.draining
    finally:
        fake.close()


def test_a_mistaken_drain_is_taken_back_and_a_later_stop_still_seen():
    fake = FakeTriton()
    try:
        with Dog(f"--http-port={fake.port}") as d:
            assert wait(lambda: d.dog.seen_up, timeout=5)
            fake.close()
            assert wait(lambda: d.events == ["drain"], timeout=5)
            fake.open()  # the same port answers again: the drain was a mistake
            assert wait(lambda: d.events == ["drain", "resume"], timeout=5)
            assert not d.dog.draining
            fake.close()  # a real stop after that is still seen
            assert wait(lambda: d.events == ["drain", "resume", "drain"], timeout=5)
            time.sleep(0.3)
            assert d.events == ["drain", "resume", "drain"]
    finally:
        fake.close()


def test_a_refusal_where_nothing_was_listening_is_not_a_shutdown():
    """tritonserver 2.51 given a bare IPv6 literal or a host name as --http-address listens on
    255.255.255.255 (seen), which refuses every probe: while a socket still listens on its port the
    refusals are not its port closing. Here: the server listens on 127.0.0.1, the probe goes to
    127.0.0.3."""
    fake = FakeTriton("127.0.0.1")
    try:
        with Dog("--http-address=127.0.0.3", f"--http-port={fake.port}") as d:
            d.dog.serving()
            time.sleep(1.0)
            assert d.events == []
            fake.close()  # now nothing listens on the port: that is a stop
            assert wait(lambda: d.events == ["drain"], timeout=5)
    finally:
        fake.close()


def test_a_dead_server_process_is_gone():
    fake = FakeTriton()
    try:
        with Dog(f"--http-port={fake.port}") as d:
            assert wait(lambda: d.dog.seen_up, timeout=5)
            assert wd.probe(d.dog.endpoint, d.server.pid) == wd.READY
            d.server.kill()
            d.server.wait()
            assert wd.probe(d.dog.endpoint, d.server.pid) == wd.GONE
    finally:
        fake.close()


# ---- the drain is cancellable: front and engine ----

class _Client:
    def __init__(self) -> None:
        self.sent, self.errors, self.done = [], [], threading.Event()

    def inputs(self) -> list:
        return []

    def send(self, tensors: dict, final: bool) -> None:
        self.sent.append((tensors, final))
        if final:
            self.done.set()

    def send_error(self, exc: Exception) -> None:
        self.errors.append(exc)
        self.done.set()

    def is_cancelled(self) -> bool:
        return False


def test_front_end_drain_takes_requests_again_and_calls_off_the_deadline():
    from tritonvl.handlers.tritonserver.front import Front, ModelCalls

    release = threading.Event()

    def stream(model, inputs, outputs, key):
        yield {"text_output": "a"}
        release.wait(5)
        yield {"text_output": "", "finish_reason": "length"}

    front = Front(ModelCalls(lambda model, inputs, outputs: {n: n for n in outputs}, stream, lambda model, key: None))
    running = _Client()
    thread = threading.Thread(target=front.serve, args=(running,))
    thread.start()
    time.sleep(0.1)
    front.begin_drain(0.3)
    refused = _Client()
    front.serve(refused)
    assert "shutting down" in str(refused.errors[0])
    front.end_drain()
    time.sleep(0.6)  # past the called-off deadline: the running request is not ended
    assert not running.done.is_set()
    release.set()
    thread.join(5)
    assert running.errors == [] and running.sent[-1][1]
    later = _Client()
    release.set()
    front.serve(later)
    assert later.errors == [] and later.sent[-1] == ({"text_output": "", "finish_reason": "length"}, True)


def test_engine_end_drain_takes_jobs_again(model_dir):
    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    def req() -> RawRequest:
        return RawRequest(text_input=b"Hello", sampling={"max_tokens": 4, "ignore_eos": True})

    with OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24, max_num_seqs=4) as pipe:
        pipe.engine.begin_drain(30)
        refused = pipe.generate([req()], timeout=60)[0]
        assert "shutting down" in refused.error
        pipe.engine.end_drain()
        after = pipe.generate([req()], timeout=60)[0]
        assert (after.error, after.finish_reason, len(after.token_ids)) == ("", "length", 4)


def test_a_probe_that_never_reaches_a_serving_server_is_logged(monkeypatch, caplog):
    """Serving requests while the probe never got an HTTP answer (an address it cannot reach) is
    logged once: the operator learns that only a closed port will be seen."""
    monkeypatch.setattr(wd, "UNANSWERED_WARNING_S", 0.3)
    fake = FakeTriton("127.0.0.1")
    try:
        with caplog.at_level("WARNING", logger="tritonvl.watchdog"), \
                Dog("--http-address=127.0.0.3", f"--http-port={fake.port}") as d:
            d.dog.serving()
            assert wait(lambda: "never answered the watchdog" in caplog.text, timeout=5)
            time.sleep(0.3)
            assert caplog.text.count("never answered the watchdog") == 1 and d.events == []
        caplog.clear()
        with caplog.at_level("WARNING", logger="tritonvl.watchdog"), Dog(f"--http-port={fake.port}") as d:
            d.dog.serving()
            time.sleep(0.8)
            assert "never answered" not in caplog.text and d.dog.answered
    finally:
        fake.close()
