"""scripts/fidelity.py (the docs/FIDELITY.md run) regenerated on a subset: the tiny Qwen2.5-VL through
a real tritonserver the script starts and stops, against transformers' generate(); written to a
temporary path, never over the committed report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = ["text", "image", "batch", "prefix_cache"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")
    out = tmp_path_factory.mktemp("fidelity")
    cmd = [sys.executable, str(ROOT / "scripts" / "fidelity.py"), "--families", "qwen2_5_vl",
           "--cases", ",".join(CASES), "--batch", "4", "--max-tokens", "12",
           "--doc", str(out / "FIDELITY.md"), "--json", str(out / "fidelity" / "fidelity.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540, env={**os.environ})
    return proc, out


def test_every_float32_answer_equals_generate(report):
    proc, out = report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "fidelity" / "fidelity.json").read_text())
    (run,) = data["runs"]
    assert (run["model"], run["family"], run["dtype"]) == ("tiny-qwen2_5_vl", "qwen2_5_vl", "float32")
    assert [c["case"] for c in run["cases"]] == CASES
    answers = [a for c in run["cases"] for a in c["answers"]]
    assert len(answers) == 1 + 1 + 4 + 3
    for a in answers:
        assert a["served"] == a["reference"] and a["match"] and a["first_divergence"] is None, a
        assert 0 < a["tokens"] <= 12
    assert run["match"] and all(c["match"] and c["identical"] == c["requests"] for c in run["cases"])
    cases = {c["case"]: c for c in run["cases"]}
    assert min(cases["prefix_cache"]["prefix_cache_hit_tokens"][1:]) > 0, "the repeated prefix was not a cache hit"
    assert cases["batch"]["requests_running_peak"] >= 2, "the batch did not run together"
    assert data["versions"]["tritonserver"] not in ("", "?")


def test_markdown_report_written(report):
    proc, out = report
    text = (out / "FIDELITY.md").read_text()
    assert "## float32: token match (9/9 answers identical: every answer identical)" in text
    assert "| tiny-qwen2_5_vl | qwen2_5_vl | prefix_cache | 3/3 |" in text
    assert "random-weight tiny models" in text
    assert "[fidelity/fidelity.json](fidelity/fidelity.json)" in text


def test_a_divergence_is_reported_not_hidden():
    """The comparison the report rests on: a single changed token is caught at its position."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from fidelity import compare

    ref = [5, 6, 7, 8]
    assert compare([5, 6, 7, 8], ref)["match"]
    assert compare([5, 6, 9, 8], ref) | {"served": None} == {"tokens": 4, "match": False, "first_divergence": 2,
                                                              "served": None, "reference": ref}
    assert compare([5, 6, 7], ref)["first_divergence"] == 3  # a shorter answer diverges where it stops
    assert compare([5, 6, 7, 8, 1], ref)["first_divergence"] == 4
