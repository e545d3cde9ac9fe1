"""An ordinary environment does not make the server drain (issue 24, "the watchdog sees only real
shutdowns"), on real tritonservers (1 and 3 share one: the dead proxy stays in its environment while 3
loads its slow model; 2 has its own, also the reference of 1 and 3):

1. A dead proxy in the server's environment (http_proxy, https_proxy, HTTP_PROXY, HTTPS_PROXY at a
   loopback port nobody listens on, no no_proxy): 12 s of requests, one a second, over HTTP and
   gRPC, all answered, greedy output equal to the same request on a server without the proxy. (Before:
   the stubs' urllib probe went to the proxy and every request from the fourth second on got "the
   server is shutting down".)
2. ``--http-address`` set to a non-loopback address of this machine: requests answered well past the
   watchdog's 1 s probe interval; SIGTERM still drains (a 4,000-token stream ends with ``cancelled``
   at the drain deadline).
3. A model briefly not ready: in explicit model-control mode a model whose initialize() takes 8 s is
   loaded; /v2/health/ready answers 400 the whole time (seen on 2.51) and every request made during
   and after the load is answered.

Each also checks the stubs never logged that their probe could not reach the server's HTTP service.
Broken on purpose (a copy of the repository whose model.py files patch the watchdog): urllib's default
opener back, (1) fails (the probe went to the proxy: "never answered the watchdog"; with the listener
check in ``probe`` also off, as the issue saw: "the server is shutting down"); the probe sent
to 127.0.0.1 whatever --http-address says, (2) fails; any non-200 answer taken for a stop, (3)
fails ("the server is shutting down").
"""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from helpers import infer_http, joined, make_image, stream_grpc

from tritonvl.handlers.tools.launcher import ServerProcess

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
IMAGE = make_image(96, 64, seed=3)
DRAIN = 3  # llm drain_deadline_s of the server in test 2
# test 1's seconds of requests: past the stubs' 1 s probes, the drain from the fourth second
# and the watchdog's UNANSWERED_WARNING_S (5 s of serving without an answer is logged), twice over
WINDOW = 12


def request(i: int) -> dict:
    """Two prompts, each asked over HTTP (even i) and gRPC (odd i): four shapes, by i % 4."""
    return {"text_input": f"Describe picture {i % 4 // 2}.", "image": [IMAGE], "max_tokens": 6, "temperature": 0.0}


def ask(srv, i: int, http_url: str | None = None) -> list[int]:
    """One greedy request (even i: HTTP /generate, odd: a gRPC stream); its output ids."""
    fields = request(i)
    if i % 2 == 0:
        out = infer_http(http_url or srv.http_url, **fields)
        return list(out["output_ids"])
    return joined(stream_grpc(srv.grpc_url, timeout=60, **fields, stream=True))["output_ids"]


def http_status(host: str, port: int, path: str = "/v2/health/ready") -> int | None:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def assert_probed(srv) -> None:
    """No drain was started, and the stubs' watchdogs reached the server's HTTP service (they log when
    it never answers them while it serves requests)."""
    log = srv.log_tail(1_000_000)
    assert "shutting down" not in log, log[-3000:]
    assert "never answered the watchdog" not in log, log[-3000:]


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine off loopback that a socket can bind, or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    if not out:
        try:
            out = [a.split("/")[0] for line in subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True,
                                                               text=True, timeout=5).stdout.splitlines()
                   for a in line.split()[3:4]]
        except (OSError, subprocess.SubprocessError):
            out = []
    for addr in out:
        if "." in addr and not addr.startswith("127."):
            try:
                with socket.socket() as s:
                    s.bind((addr, 0))
                return addr
            except OSError:
                continue
    return None


class AtAddress(ServerProcess):
    """A ServerProcess whose HTTP service listens on ``address`` only (its readiness is asked there);
    with ``address`` None, the launcher's default (all addresses)."""

    def __init__(self, *args, address: str | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.address = address
        if address:
            self.extra = [*self.extra, f"--http-address={address}"]

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}" if self.address else super().http_url


@pytest.fixture(scope="module")
def plain(model_dir, tmp_path_factory):
    """A server without a proxy, its HTTP service on a non-loopback address when this machine has one
    (test 2; test 1's reference)."""
    log = tmp_path_factory.mktemp("plain") / "server.log"
    srv = AtAddress(str(model_dir), log_path=str(log), address=non_loopback_ipv4(),
                    overrides={"llm": {"drain_deadline_s": str(DRAIN)}})
    srv.start()
    try:
        srv.expected = {i: ask(srv, i) for i in range(4)}  # each prompt each way (HTTP, gRPC), no proxy
        yield srv
    finally:
        srv.stop()


SLOW_MODEL = '''
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(8)  # the server is not ready while this model loads

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, "X")]) for r in requests]
'''

SLOW_CONFIG = '''name: "slow_to_load"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''


@pytest.fixture(scope="module")
def proxied(model_dir, tmp_path_factory):
    """The server of tests 1 and 3: a dead proxy in its environment (every proxy variable at a loopback
    port nobody listens on, no no_proxy), explicit model-control mode with the pipeline loaded at start,
    and a repository copy that also holds ``slow_to_load`` (test 3 loads it)."""
    from tritonvl.handlers.tools.repository import default_model_repository

    where = tmp_path_factory.mktemp("proxied")
    repo = where / "repo"
    shutil.copytree(default_model_repository(), repo, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "slow_to_load" / "1").mkdir(parents=True)
    (repo / "slow_to_load" / "config.pbtxt").write_text(SLOW_CONFIG)
    (repo / "slow_to_load" / "1" / "model.py").write_text(SLOW_MODEL)
    proxy = f"http://127.0.0.1:{dead_port()}"
    env = {var: proxy for var in PROXY_VARS} | {"no_proxy": "", "NO_PROXY": ""}
    pipeline = [f"--load-model={m}" for m in ("preprocess", "vision_encoder", "llm", "qwen2_5_vl")]
    with ServerProcess(str(model_dir), repo=repo, log_path=str(where / "server.log"), env=env,
                       extra=["--model-control-mode=explicit", *pipeline]) as srv:
        yield srv


def test_a_dead_proxy_in_the_environment_changes_nothing(proxied, plain):
    srv, expected = proxied, plain.expected
    start, i, answered = time.monotonic(), 0, []
    while time.monotonic() - start < WINDOW:
        got = ask(srv, i)  # raises on "the server is shutting down"
        assert got == expected[i % 4], (i, got, expected[i % 4])
        answered.append(round(time.monotonic() - start, 1))
        i += 1
        time.sleep(1.0)
    assert srv.proc.poll() is None and http_status("127.0.0.1", srv.http_port) == 200
    assert_probed(srv)
    assert len(answered) >= 6 and answered[-1] > WINDOW - 3, answered


def test_a_non_loopback_http_address_serves_past_the_probe_interval_and_still_drains(plain):
    if not plain.address:
        pytest.skip("this machine has no non-loopback IPv4 address a socket can bind (hostname -I, ip addr)")
    start = time.monotonic()
    for i in range(6):
        ask(plain, i, plain.http_url)  # HTTP at the non-loopback address, gRPC on all addresses
        time.sleep(1.0)
    assert time.monotonic() - start > 5  # five probe intervals and more
    assert http_status(plain.address, plain.http_port) == 200
    assert_probed(plain)
    # SIGTERM: the port closes at that address, the watchdog sees it, llm ends the stream at DRAIN
    out: dict = {}

    def long_stream():
        try:
            out["responses"] = stream_grpc(plain.grpc_url, timeout=60, text_input="A long story.", max_tokens=4000,
                                           ignore_eos=True, stream=True)
        except Exception as exc:  # noqa: BLE001 (reported below)
            out["error"] = exc

    thread = threading.Thread(target=long_stream)
    thread.start()
    time.sleep(2)
    signalled = time.monotonic()
    plain.proc.send_signal(signal.SIGTERM)
    thread.join(DRAIN + 20)
    ended = time.monotonic() - signalled
    assert not thread.is_alive(), "the stream did not end after SIGTERM"
    assert "error" not in out, out.get("error")
    assert out["responses"][-1].get("finish_reason") == "cancelled", out["responses"][-1]
    assert ended < DRAIN + 8, ended
    assert plain.proc.wait(40) == 0, plain.log_tail()


def test_a_model_briefly_not_ready_does_not_drain(proxied, plain):
    srv, expected = proxied, plain.expected
    assert [ask(srv, i) for i in range(4)] == [expected[i] for i in range(4)]  # served: a stop would be noticed
    loaded: dict = {}

    def load():
        conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=120)
        try:
            conn.request("POST", "/v2/repository/models/slow_to_load/load")
            loaded["status"] = conn.getresponse().status
        finally:
            conn.close()

    loader = threading.Thread(target=load)
    loader.start()
    statuses, i = [], 1
    while loader.is_alive():
        statuses.append(http_status("127.0.0.1", srv.http_port))
        assert ask(srv, i) == expected[i % 4], i  # answered while the server is not ready
        i += 1
        time.sleep(0.5)
    loader.join()
    assert loaded.get("status") == 200, loaded
    assert 400 in statuses, f"the server was never seen not ready: {statuses}"
    time.sleep(3)  # a drain started during the load would refuse what follows
    assert [ask(srv, i) for i in range(4)] == [expected[i] for i in range(4)]
    assert http_status("127.0.0.1", srv.http_port) == 200
    assert_probed(srv)
    assert i > 6, "too few requests during the load"
