"""The README's serve command, as a user runs it: set-up, the embedded model, a curl with an image."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import make_image

ROOT = Path(__file__).resolve().parents[2]


def test_serve_script_answers_curl_with_an_image(tmp_path):
    from tritonvl.handlers.tools.launcher import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["bash", "scripts/serve.sh", "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TRITONVL_CACHE": str(tmp_path / "cache")})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"localhost:{http}/v2/health/ready"], capture_output=True, text=True)
            if r.stdout == "200":
                break
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        img = base64.b64encode(make_image(120, 90, seed=77, fmt="JPEG")).decode()
        body = json.dumps({"text_input": "What is in this image?", "image": [img], "max_tokens": 8,
                           "temperature": 0, "exclude_input_in_output": True})
        r = subprocess.run(["curl", "-s", f"localhost:{http}/v2/models/qwen2_5_vl/generate", "-d", body],
                           capture_output=True, text=True, timeout=120)
        out = json.loads(r.stdout)
        assert out["num_output_tokens"] == 8 and out["finish_reason"] == "length", out
        assert (tmp_path / "cache" / "tiny-qwen2.5-vl" / "model.safetensors").is_file()  # built on first use
    finally:
        proc.send_signal(signal.SIGINT)  # forwarded to tritonserver: a graceful stop
        rc = proc.wait(timeout=120)
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
