"""scripts/gpu_check.py on CPU: the in-process pipeline equals generate() in float32, and the
decode-speed report has sane figures. (On a GPU the same script gives the CUDA numbers.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_on_cpu(model_dir, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu",
                           "--model", str(model_dir), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["equal"] for r in report["parity_fp32"]] == [True] * 3
    assert {r["images"] for r in report["parity_fp32"]} == {0, 1, 2}
    for row in report["decode"]:
        assert 0 < row["itl_ms"] < 10_000 and row["bound_tokens_per_s"] > 0
    assert "fp32 parity: PASS" in proc.stdout
