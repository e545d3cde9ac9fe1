"""The gateway's guard, before any body is read: API keys (401 in OpenAI's shape; /health and
/metrics open), the body limit from Content-Length (413) and the bound on requests in flight (429).
`tritonvl serve --openai-port` binds the gateway to loopback and hands it the keys through its
environment, never a command line. Real tritonserver, real gateway processes, the openai SDK."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import openai
import psutil
import pytest
import requests
from conftest import gateway_metrics
from helpers import proc_info, wait_for

from tritonvl.handlers.gateway.process import GatewayProcess
from tritonvl.handlers.tools.launcher import free_port

KEYS = ("sk-tvl-test-first-1f3a", "sk-tvl-test-second-9c2e")
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
MB = 1_000_000


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, grpc_port: int, model: str) -> None:
        self.proc, self.port, self.model = proc, port, model
        self.url, self.grpc_url = f"http://127.0.0.1:{port}", f"localhost:{grpc_port}"


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """`tritonvl serve --openai-port` with the keys in $TRITONVL_API_KEY as a Secret gives them: one
    per line, a trailing newline."""
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")
    ports = [free_port() for _ in range(4)]
    log = open(tmp_path_factory.mktemp("guard") / "serve.log", "wb")
    cmd = [sys.executable, "-m", "tritonvl.client.cli", "serve", "--model", str(model_dir), "--http-port",
           str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--openai-port", str(ports[3])]
    env = {**os.environ, "TRITONVL_API_KEY": "\n".join(KEYS) + "\n"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    s = Served(proc, ports[3], ports[1], str(model_dir))  # served name: --model as given
    try:
        ok = wait_for(lambda: proc.poll() is not None or _status(f"{s.url}/health") == 200, timeout=400, interval=1)
        assert ok and proc.poll() is None, f"tritonvl serve --openai-port did not come up (log: {log.name})"
        yield s
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert _status(f"{s.url}/health") is None, "the gateway outlived tritonvl serve"


def _status(url: str, **kw):
    try:
        return requests.get(url, timeout=10, **kw).status_code
    except requests.ConnectionError:
        return None


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


# ---- keys ----------------------------------------------------------------------------------------

def test_no_key_and_wrong_key_are_401_right_keys_200(served):
    for key in KEYS:  # each configured key works, whole and streamed
        out = sdk(served.url, key).chat.completions.create(model=served.model, messages=HI, max_tokens=3)
        assert out.choices[0].finish_reason == "length"
        chunks = list(sdk(served.url, key).chat.completions.create(model=served.model, messages=HI, max_tokens=3,
                                                                  stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
    for wrong in ("sk-wrong", KEYS[0][:-1], KEYS[0] + "x", KEYS[0].upper()):
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(served.url, wrong).chat.completions.create(model=served.model, messages=HI, max_tokens=3)
        assert info.value.status_code == 401
        assert info.value.body == {"message": "incorrect API key provided", "type": "invalid_request_error",
                                   "param": None, "code": "invalid_api_key"}
    with pytest.raises(openai.AuthenticationError) as info:  # the SDK with its Authorization header left out
        sdk(served.url, "unused").chat.completions.create(model=served.model, messages=HI, max_tokens=3,
                                                          extra_headers={"Authorization": openai.Omit()})
    assert info.value.body["code"] == "invalid_api_key" and "Bearer" in info.value.body["message"]


def test_every_endpoint_but_health_and_metrics_needs_the_key(served):
    assert requests.get(f"{served.url}/health", timeout=10).json() == {"status": "ok"}
    assert "tritonvl_gateway_auth_required 1.0" in requests.get(f"{served.url}/metrics", timeout=10).text
    for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("POST", "/v1/completions"),
                         ("POST", "/describe-image/"), ("GET", "/nowhere"), ("GET", "/health/")):
        for headers in ({}, bearer("nope"), {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer"},
                        {"Authorization": KEYS[0]}):
            r = requests.request(method, served.url + path, headers=headers, timeout=10)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (path, headers, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(f"{served.url}/v1/models", headers=bearer(KEYS[1]), timeout=10).status_code == 200
    assert requests.get(f"{served.url}/v1/models", headers={"Authorization": f"bearer  {KEYS[1]} "},
                        timeout=10).status_code == 200  # the scheme's case and spaces around the key do not matter
    assert gateway_metrics(served.url)['tritonvl_gateway_rejected_total{reason="auth"}'] >= 30


def test_serve_binds_loopback_and_keeps_keys_off_command_lines(served):
    tree = [psutil.Process(served.proc.pid), *psutil.Process(served.proc.pid).children(recursive=True)]
    (gateway,) = [p for p in tree if "gateway" in proc_info(p, "cmdline")]
    listening = {c.laddr for c in gateway.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", served.port)}, listening
    for p in tree:
        assert not any(k in " ".join(proc_info(p, "cmdline")) for k in KEYS), proc_info(p, "cmdline")
    assert gateway.environ()["TRITONVL_API_KEY"].split() == list(KEYS)
    (triton,) = [p for p in tree if proc_info(p) == "tritonserver"]
    assert "TRITONVL_API_KEY" not in triton.environ()  # not the server's (nor its Python stubs') to hold


def _gateway_alone(tmp_path, args: list[str], env_key: str | None = None, name: str = "gw"):
    """A gateway in front of no Triton (not started) and its log; ``env_key``: its $TRITONVL_API_KEY."""
    log = tmp_path / f"{name}.log"
    gw = GatewayProcess(f"localhost:{free_port()}", free_port(), args=args, log_path=str(log),
                        api_keys=None if env_key is None else [env_key])
    if env_key is None:
        gw.env.pop("TRITONVL_API_KEY", None)
    return gw, log


def test_gateway_flags_env_and_the_open_port_warning(tmp_path):
    """--api-key (repeatable) wins over $TRITONVL_API_KEY; past the key, a request reaches Triton
    (here: none, 503). Off loopback without a key: a loud warning, and it serves (vLLM's default)."""
    gw, log = _gateway_alone(tmp_path, ["--api-key", "flag-a", "--api-key", "flag-b"], env_key="env-c", name="flags")
    with gw:
        for key, status in (("flag-a", 503), ("flag-b", 503), ("env-c", 401)):
            r = requests.post(gw.url + CHAT, json={"messages": HI}, headers=bearer(key), timeout=30)
            assert r.status_code == status, (key, r.text)
    gw, log = _gateway_alone(tmp_path, ["--host", "0.0.0.0"], env_key="env-c", name="env")
    with gw:
        assert requests.post(gw.url + CHAT, json={"messages": HI}, headers=bearer("env-c"), timeout=30).status_code == 503
    text = log.read_text()
    assert "API key required (1 key)" in text and "WARNING" not in text and "env-c" not in text, text
    gw, log = _gateway_alone(tmp_path, ["--host", "0.0.0.0"], name="open")
    with gw:
        assert requests.post(gw.url + CHAT, json={"messages": HI}, timeout=30).status_code == 503
    assert "WARNING: listening on 0.0.0.0:" in log.read_text() and "NO API KEY" in log.read_text()
    gw, log = _gateway_alone(tmp_path, ["--host", "127.0.0.1"], name="loopback")
    with gw:
        pass
    assert "WARNING" not in log.read_text() and "no API key" in log.read_text()


def test_bad_key_values_are_refused_at_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tritonvl.client.cli", "gateway", "--api-key", "has space"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "API key #1" in out.stderr and "has space" not in out.stderr, out.stderr


# ---- before the body is read ---------------------------------------------------------------------

def raw_post(port: int, length: int, send_body: bool, headers: dict | None = None) -> tuple[int, int]:
    """POST a body of ``length`` bytes declared in Content-Length: (the status answered, body bytes
    the server had taken when it answered). ``send_body=False`` sends none: an answer then proves
    the body was never waited for."""
    s = socket.create_connection(("127.0.0.1", port))
    lines = [f"POST {CHAT} HTTP/1.1", "Host: gateway", "Content-Type: application/json",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sent, answered = [0], [None]

    def pump() -> None:
        chunk = b" " * (1 << 20)
        try:
            while sent[0] < length:
                sent[0] += s.send(chunk[:length - sent[0]])
        except OSError:
            pass

    sender = threading.Thread(target=pump, daemon=True)
    if send_body:
        sender.start()
    s.settimeout(60)
    head = b""
    try:
        while b"\r\n" not in head:
            data = s.recv(4096)
            if not data:
                break
            head += data
            answered[0] = sent[0]
    finally:
        if send_body:
            sender.join(60)
        s.close()
    return int(head.split(b" ", 2)[1]), answered[0]


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident memory now, its peak since the process started: VmHWM), MiB. The peak is what a body
    read and freed again would show: the memory is often back to the system by the time we look."""
    with open(f"/proc/{pid}/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return psutil.Process(pid).memory_info().rss / 2**20, peak


def _hold_a_slot(gw: GatewayProcess):
    """A long stream that keeps the gateway's one slot; returns (response, its line iterator)."""
    r = requests.post(gw.url + CHAT, json={"messages": HI, "max_tokens": 4000, "ignore_eos": True, "stream": True},
                      headers=bearer(KEYS[0]), stream=True, timeout=60)
    assert r.status_code == 200
    lines = r.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
    next(lines)
    return r, lines


def test_70mb_body_is_refused_before_it_is_read(served, tmp_path, record_property):
    with GatewayProcess(served.grpc_url, free_port(), args=["--max-concurrent", "1"], api_keys=[KEYS[0]],
                        log_path=str(tmp_path / "gw.log")) as gw:
        for _ in range(3):  # warm: the first requests' allocations are not the body's
            assert requests.post(gw.url + CHAT, json={"messages": HI, "max_tokens": 2}, headers=bearer(KEYS[0]),
                                 timeout=60).status_code == 200
        before = rss_mb(gw.proc.pid)
        status, _ = raw_post(gw.port, 70 * MB, send_body=True, headers=bearer(KEYS[0]))
        assert status == 413
        r = requests.post(gw.url + CHAT, data=b" " * (70 * MB), headers={**bearer(KEYS[0]),
                          "Content-Type": "application/json"}, timeout=120)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        after = rss_mb(gw.proc.pid)
        print(f"\n70 MB bodies with a Content-Length, sent whole: gateway RSS {before[0]:.1f} -> {after[0]:.1f} MiB, "
              f"peak {before[1]:.1f} -> {after[1]:.1f} MiB")
        record_property("rss_now_peak_mib", [before, after])
        assert after[1] - before[1] < 16, (before, after)  # a body read would have been 64+ MiB
        # no body byte sent at all, and the answer comes: nothing waited for the body
        assert raw_post(gw.port, 70 * MB, send_body=False, headers=bearer(KEYS[0])) == (413, 0)
        assert raw_post(gw.port, 70 * MB, send_body=False) == (401, 0)  # no key: refused first
        # chunked, no Content-Length: counted as read, cut at the 64 MiB limit
        r = requests.post(gw.url + CHAT, data=iter([b" " * MB] * 70), headers=bearer(KEYS[0]), timeout=120)
        assert r.status_code == 413, r.text
        assert requests.post(gw.url + CHAT, json={"messages": HI, "max_tokens": 2}, headers=bearer(KEYS[0]),
                             timeout=60).status_code == 200
        m = gateway_metrics(gw.url)
        assert m['tritonvl_gateway_rejected_total{reason="body_size"}'] == 4


def test_over_the_concurrency_limit_is_refused_before_the_body_is_read(served, tmp_path, record_property):
    with GatewayProcess(served.grpc_url, free_port(), args=["--max-concurrent", "1"], api_keys=[KEYS[0]],
                        log_path=str(tmp_path / "gw.log")) as gw:
        assert requests.post(gw.url + CHAT, json={"messages": HI, "max_tokens": 2}, headers=bearer(KEYS[0]),
                             timeout=60).status_code == 200
        first, _lines = _hold_a_slot(gw)
        before = rss_mb(gw.proc.pid)
        assert raw_post(gw.port, 40 * MB, send_body=True, headers=bearer(KEYS[0]))[0] == 429
        r = requests.post(gw.url + CHAT, data=json.dumps({"messages": HI, "pad": " " * (40 * MB)}),
                          headers=bearer(KEYS[0]), timeout=120)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
        after = rss_mb(gw.proc.pid)
        print(f"\n40 MB bodies over the concurrency limit: gateway RSS {before[0]:.1f} -> {after[0]:.1f} MiB, "
              f"peak {before[1]:.1f} -> {after[1]:.1f} MiB")
        record_property("rss_now_peak_mib", [before, after])
        assert after[1] - before[1] < 16, (before, after)
        assert raw_post(gw.port, 40 * MB, send_body=False, headers=bearer(KEYS[0])) == (429, 0)
        first.close()
        assert wait_for(lambda: gateway_metrics(gw.url)["tritonvl_gateway_requests_in_flight"] == 0, 10)
        assert requests.post(gw.url + CHAT, json={"messages": HI, "max_tokens": 2}, headers=bearer(KEYS[0]),
                             timeout=60).status_code == 200
        assert gateway_metrics(gw.url)['tritonvl_gateway_rejected_total{reason="concurrency"}'] == 3
