"""The containers' entrypoint (scripts/entrypoint.sh), run here without Docker: configured from the
environment as in deploy/, it serves the test model (Triton and the OpenAI gateway), answers, and on
SIGTERM leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
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


def test_entrypoint_serves_and_stops_cleanly(model_dir, tmp_path):
    from tritonvl.handlers.tools.launcher import free_port

    http, grpc, metrics, openai = free_port(), free_port(), free_port(), free_port()
    env = {"TRITONVL_OPENAI_PORT": str(openai), **os.environ, "TRITONVL_MODEL": str(model_dir), "TRITONVL_DEVICE": "cpu",
           "TRITONVL_SET": "llm.max_num_seqs=5  vision_encoder.num_threads=1",
           "TRITONVL_HTTP_PORT": str(http), "TRITONVL_GRPC_PORT": str(grpc), "TRITONVL_METRICS_PORT": str(metrics)}
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
        # The gateway the images start beside Triton (TRITONVL_OPENAI_PORT), on the Service's `openai` port.
        r = requests.get(f"http://localhost:{openai}/v1/models", timeout=30, headers=CLOSE)
        assert r.status_code == 200 and r.json()["data"], r.text
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
