"""The containers' entrypoint (scripts/entrypoint.sh), run here without Docker: configured from the
environment as in deploy/, it serves the test model (Triton and the OpenAI gateway), answers, keeps
Triton's management APIs behind the admin key and its models fixed, and on SIGTERM leaves no process
behind; it refuses to start the gateway without a key."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
# Triton waits up to its exit timeout (30 s) for open HTTP connections at SIGTERM; a client that
# keeps its connection alive would hold the shutdown (seen with requests' pooled connection).
CLOSE = {"Connection": "close"}


def session_members(sid: int) -> list[psutil.Process]:
    """Every live process of the session the entrypoint leads (stubs re-parented to init included)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return out


ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"
API_KEY, ADMIN_KEY = "test-gateway-key", "test-admin-key"
ADMIN = {"tritonvl-admin-key": ADMIN_KEY}  # HTTP; gRPC prefixes the name with triton-grpc-protocol-


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRITONVL_")}


@pytest.mark.parametrize("env, message", [
    ({"TRITONVL_OPENAI_PORT": "9999"}, "set TRITONVL_API_KEY"),
    ({"TRITONVL_OPENAI_PORT": "9999", "TRITONVL_OPENAI_HOST": "10.0.0.1"}, "set TRITONVL_API_KEY"),
    ({"TRITONVL_ADMIN_KEY": "a:b=c"}, "TRITONVL_ADMIN_KEY"),
])
def test_entrypoint_refuses_unsafe_settings(env, message, tmp_path):
    """Before anything starts: exit status 2 and a message naming what to set."""
    fake = tmp_path / "tritonvl"  # stands in for the real command: it must never be reached
    fake.write_text("#!/bin/sh\necho started >> \"$0.log\"\n")
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(ENTRYPOINT)], env={**clean_env(), **env, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "tritonvl.log").exists()


def test_entrypoint_arguments(tmp_path):
    """What `tritonvl serve` gets: the gateway on loopback needs no key; tritonserver's own flags after
    one `--`, the container's after the entrypoint's; a random admin key when none is given."""
    fake = tmp_path / "tritonvl"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.args"\n')
    fake.chmod(0o755)

    def run(env: dict, *args: str) -> list[str]:
        r = subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                           env={**clean_env(), **env, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
        assert r.returncode == 0, r.stderr
        return (tmp_path / "tritonvl.args").read_text().splitlines()

    argv = run({"TRITONVL_OPENAI_PORT": "9100", "TRITONVL_OPENAI_HOST": "127.0.0.1"}, "--device", "cpu", "--",
               "--log-verbose=1")
    assert argv[0] == "serve" and argv.count("--") == 1
    serve, server = argv[1:argv.index("--")], argv[argv.index("--") + 1:]
    assert serve[serve.index("--openai-host") + 1] == "127.0.0.1" and serve[-2:] == ["--device", "cpu"]
    assert server[0] == "--model-control-mode=none" and server[-1] == "--log-verbose=1"
    apis = "model-repository,model-config,shared-memory,statistics,trace,logging"
    key = server[1].rpartition("=")[2]
    assert re.fullmatch(r"[0-9a-f]{64}", key)  # drawn at start: nobody knows it
    assert server[1:3] == [f"--http-restricted-api={apis}:tritonvl-admin-key={key}",
                           f"--grpc-restricted-protocol={apis}:tritonvl-admin-key={key}"]
    again = run({})
    assert key not in again[-1] and "--openai-port" not in again  # a new key each start; no gateway by default
    assert run({"TRITONVL_ADMIN_KEY": ADMIN_KEY})[-1].endswith(f":tritonvl-admin-key={ADMIN_KEY}")
    assert "gateway-key" not in " ".join(run({"TRITONVL_OPENAI_PORT": "9100", "TRITONVL_API_KEY": API_KEY}))


def test_entrypoint_serves_and_stops_cleanly(model_dir, tmp_path):
    from tritonvl.handlers.tools.launcher import free_port

    http, grpc, metrics, openai = free_port(), free_port(), free_port(), free_port()
    env = {**clean_env(), "TRITONVL_OPENAI_PORT": str(openai), "TRITONVL_MODEL": str(model_dir), "TRITONVL_DEVICE": "cpu",
           "TRITONVL_SET": "llm.max_num_seqs=5  vision_encoder.num_threads=1",
           "TRITONVL_HTTP_PORT": str(http), "TRITONVL_GRPC_PORT": str(grpc), "TRITONVL_METRICS_PORT": str(metrics),
           # as deploy/ passes them, from the tritonvl-keys Secret
           "TRITONVL_API_KEY": API_KEY, "TRITONVL_ADMIN_KEY": ADMIN_KEY}
    log_path = tmp_path / "entrypoint.log"
    log = open(log_path, "wb")
    # Its own session, as PID 1's children are in a container: everything it starts is findable.
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "entrypoint.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 300 s:\n" + log_path.read_text()[-3000:]
            try:
                if requests.get(f"http://localhost:{http}/v2/health/ready", timeout=2, headers=CLOSE).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert requests.get(f"http://localhost:{http}/v2/health/live", timeout=5, headers=CLOSE).status_code == 200
        r = requests.post(f"http://localhost:{http}/v2/models/qwen2_5_vl/generate", timeout=120, headers=CLOSE,
                          json={"text_input": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["num_output_tokens"] == 4
        # The gateway the images start beside Triton (TRITONVL_OPENAI_PORT), on the Service's `openai` port,
        # with the key its clients send.
        r = requests.get(f"http://localhost:{openai}/v1/models", timeout=30,
                         headers={**CLOSE, "Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.json()["data"], r.text
        # the key reached the gateway (TRITONVL_API_KEY, inherited through `tritonvl serve`)
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.get(f"http://localhost:{openai}/v1/models", timeout=30, headers={**CLOSE, **auth})
            assert r.status_code == 401, (auth, r.status_code, r.text)
        check_restricted_apis(http, grpc)
        # TRITONVL_SET reached the engine (a --set per word), on the metrics port the Service scrapes.
        text = requests.get(f"http://localhost:{metrics}/metrics", timeout=5, headers=CLOSE).text
        assert re.search(r'tritonvl_engine_info\{[^}]*max_num_seqs="5"', text), text[-2000:]
        assert "nv_inference_queue_duration_us" in text and "tritonvl_num_requests_waiting" in text
        # `exec`: the runtime's signal goes to `tritonvl serve` itself, not to a shell in front of it.
        cmd = psutil.Process(proc.pid).cmdline()
        assert "serve" in cmd and not cmd[0].endswith("bash"), cmd
        members = session_members(proc.pid)
        names = " ".join(p.name() for p in members)
        assert "tritonserver" in names and "triton_python_backend_stub" in names, names
    finally:
        t0 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            rc = None
        stop_s = time.monotonic() - t0
        log.close()
        left = []
        for _ in range(20):  # stubs exit right after the server; give them a moment
            left = session_members(proc.pid)
            if not left:
                break
            time.sleep(0.5)
        if left:  # never leave the machine a stray server, whatever failed above
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, log_path.read_text()[-3000:]
    assert not left, [(p.pid, p.name()) for p in left]
    assert stop_s < 25, f"stopping took {stop_s:.0f} s (Triton's exit timeout is 30 s)"


def check_restricted_apis(http: int, grpc: int) -> None:
    """Health, metadata and inference open; the management APIs need the admin key; with it, the
    model control mode `none` still refuses to load or unload a model."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    base = f"http://localhost:{http}/v2"
    assert requests.get(f"{base}/models/qwen2_5_vl", timeout=5, headers=CLOSE).status_code == 200  # metadata
    for method, path in [("post", "/repository/index"), ("get", "/models/llm/config"), ("get", "/models/stats"),
                         ("get", "/systemsharedmemory/status"), ("get", "/trace/setting"), ("get", "/logging")]:
        denied = requests.request(method, base + path, timeout=5, headers=CLOSE)
        assert denied.status_code == 403 and "restricted" in denied.text, (path, denied.status_code, denied.text)
        wrong = requests.request(method, base + path, timeout=5, headers={**CLOSE, "tritonvl-admin-key": "nope"})
        assert wrong.status_code == 403, (path, wrong.status_code)
        allowed = requests.request(method, base + path, timeout=5, headers={**CLOSE, **ADMIN})
        assert allowed.status_code == 200, (path, allowed.status_code, allowed.text)
    r = requests.post(f"{base}/repository/models/llm/unload", timeout=5, headers={**CLOSE, **ADMIN})
    assert r.status_code != 200 and "not allowed" in r.text, (r.status_code, r.text)
    assert requests.get(f"{base}/models/llm/ready", timeout=5, headers=CLOSE).status_code == 200

    client = grpcclient.InferenceServerClient(f"localhost:{grpc}")
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_inference_statistics("llm")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        grpc_admin = {"triton-grpc-protocol-tritonvl-admin-key": ADMIN_KEY}
        assert client.get_inference_statistics("llm", headers=grpc_admin, as_json=True)["model_stats"]
        assert client.get_model_repository_index(headers=grpc_admin, as_json=True)["models"]
        assert client.is_model_ready("qwen2_5_vl")  # health stays open
    finally:
        client.close()
