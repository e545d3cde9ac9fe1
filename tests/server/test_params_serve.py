"""Parameters end to end: `tritonvl serve --set` (the real CLI) and a misspelt key in a config.pbtxt."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "tritonvl.client.cli", "serve"]


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """`tritonvl serve --set llm.max_num_seqs=3` as a user runs it; SIGINT at the end."""
    from tritonvl.handlers.tools.launcher import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    cmd = CLI + ["--model", str(model_dir), "--http-port", str(http), "--grpc-port", str(grpc),
                 "--metrics-port", str(metrics), "--set", "llm.max_num_seqs=3"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a loaded CI machine loads the three models slowly
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"http://localhost:{http}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("not ready: " + log_path.read_text()[-3000:])
        yield {"http": http, "metrics": metrics, "log": log_path}
    finally:
        proc.send_signal(signal.SIGINT)  # `tritonvl serve` forwards it to tritonserver
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_serve_set_overrides_a_parameter_for_that_run(served):
    text = requests.get(f"http://localhost:{served['metrics']}/metrics", timeout=10).text
    info = [line for line in text.splitlines() if line.startswith("tritonvl_engine_info{")]
    assert info and 'max_num_seqs="3"' in info[0], info
    body = {"text_input": "Hello", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    r = requests.post(f"http://localhost:{served['http']}/v2/models/qwen2_5_vl/generate", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["num_output_tokens"] == 4, r.text
    shipped = (ROOT / "model_repository" / "llm" / "config.pbtxt").read_text()
    assert re.search(r'key: "max_num_seqs" value: \{ string_value: "64" \}', shipped)  # the repository is untouched
    assert "llm.max_num_seqs=3" in served["log"].read_text()


def test_serve_set_with_a_misspelt_key_exits_before_tritonserver_starts():
    t = time.monotonic()
    proc = subprocess.run(CLI + ["--set", "llm.max_num_seqz=3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "max_num_seqz" in proc.stderr and "did you mean 'max_num_seqs'" in proc.stderr, proc.stderr
    assert "--model-repository" not in proc.stdout + proc.stderr  # no tritonserver command was run
    assert time.monotonic() - t < 30


def test_serve_set_with_a_bad_value_names_the_rule():
    proc = subprocess.run(CLI + ["--set", "llm.instance_kind=KIND_TPU"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "instance_kind" in proc.stderr and "KIND_GPU" in proc.stderr, proc.stderr


def test_misspelt_key_in_config_pbtxt_fails_that_models_load(model_dir, tmp_path):
    """A repository with a typo (no --set check in the way): tritonserver itself refuses the llm."""
    from tritonvl.handlers.tools.launcher import ServerProcess

    repo = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = repo / "llm" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + 'parameters: { key: "max_num_seqz" value: { string_value: "3" } }\n')
    log = tmp_path / "server.log"
    # only the llm: its load is what fails, and the others need not load for that
    srv = ServerProcess(str(model_dir), repo=repo, log_path=str(log),
                        extra=["--model-control-mode=explicit", "--load-model=llm"], ready_timeout=600)
    with pytest.raises(RuntimeError, match="exited"):
        srv.start()
    text = log.read_text()
    assert "llm: unknown parameter 'max_num_seqz' (did you mean 'max_num_seqs'?)" in text, text[-3000:]
    assert srv.proc.poll() is not None
