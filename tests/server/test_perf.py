"""The load-test recipe (scripts/perf.py + perf_analyzer) against the live server: a short pass so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parents[2] / "scripts" / "perf.py"


def test_perf_analyzer_images_streaming(server, tmp_path):
    cmd = [sys.executable, str(PERF), "run", "--url", server.grpc_url, "--mode", "both", "--concurrency", "2",
           "--request-count", "6", "--warmup", "0", "--num-data", "4", "--max-tokens", "6",
           "--image-size", "224x168", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "one response per request" in out and "stream, TTFT = first response" in out, out
    assert "infer/s" in out and "p99 ms" in out and "TTFT p50" in out, out

    rows = json.loads((tmp_path / "qwen2_5_vl-both-concurrency.json").read_text())
    assert (tmp_path / "qwen2_5_vl-both-concurrency.csv").is_file()
    assert [r["mode"] for r in rows] == ["one", "stream"]
    for row in rows:
        assert "error" not in row, row
        assert row["infer_per_s"] > 0 and row["output_tokens_per_s"] > 0, row
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"], row
        assert row["requests"] >= 6 and row["vision_encoder_batch"] >= 1, row
    one, stream = rows
    # one response per request: no earlier first response; streaming: the first delta comes before the end
    assert one["ttft_p50_ms"] == one["e2e_p50_ms"]
    assert stream["ttft_p50_ms"] < stream["e2e_p50_ms"] and stream["responses_per_s"] > stream["infer_per_s"]
    # the input data carried the images as base64 BYTES elements
    data = json.loads((tmp_path / "logs" / "input-qwen2_5_vl-stream.json").read_text())["data"]
    assert len(data) == 4 and all(d["image"]["shape"] == [1] and d["stream"]["content"] == [True] for d in data)
