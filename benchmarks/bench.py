"""Side-by-side serving benchmark: (A) naive per-request generate() FastAPI server, (B) the Triton
ensemble with per-request generate() (llm backend "generate"), (C) the Triton ensemble with the
continuous-batching engine. Same model, same machine, same load, one run.

    python benchmarks/bench.py --model tiny --concurrency 1,4,16,32,64
    python benchmarks/bench.py --model bench --systems A,B,C --out docs/bench

Writes results-<model>.json, a Markdown table (printed, and results-<model>.md) and PNG plots (when
matplotlib is installed: the set-up does not install it). Each server's log is kept in --log-dir
(default /tmp/tritonvl-bench-logs, one file per system and model, overwritten by the next run; the
paths are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from load import b64, run_load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

MODELS = {"tiny": None, "bench": "bench"}  # None: the embedded default model; else a tiny_model preset


def build_model(name: str) -> str:
    from tritonvl.handlers.tiny_model import (
        PRESETS,
        build_tiny_model,
        default_model_dir,
        ensure_default_model,
    )

    if MODELS[name] is None:
        return str(ensure_default_model())
    path = default_model_dir().parent / f"bench-{name}"
    if not (path / "model.safetensors").is_file():
        build_tiny_model(path, PRESETS[MODELS[name]])
    return str(path)


def make_image(seed: int, w: int = 224, h: int = 168) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bodies(workload: str, n: int, max_tokens: int, offset: int) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        body = {"text_input": f"Request {i}: describe the history of lighthouses in detail.",
                "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "exclude_input_in_output": True}
        if workload == "image":
            body["image"] = [b64(make_image(i))]
        out.append(body)
    return out


class Memory(threading.Thread):
    """Peak resident memory of a process tree, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except Exception:
                pass
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(records, wall: float, peak: int) -> dict:
    ok = [r for r in records if r.ok]
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "output_tokens_per_s": sum(r.tokens for r in ok) / wall, "requests_per_s": len(ok) / wall,
        "ttft_p50_ms": 1e3 * pct([r.ttft for r in ok], 50), "ttft_p99_ms": 1e3 * pct([r.ttft for r in ok], 99),
        "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99),
        "latency_p50_ms": 1e3 * pct([r.latency for r in ok], 50), "peak_rss_mb": peak / 2**20,
        "first_error": next((r.error for r in records if not r.ok), ""),
    }


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def log_file(log_dir: str, name: str) -> str:
    """Where a server's log is kept (the folder made; printed so that it can be found after a crash)."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = str(Path(log_dir) / name)
    print(f"server log: {path}", flush=True)
    return path


class Naive:
    """(A) started as a subprocess."""

    def __init__(self, model_dir: str, log_path: str) -> None:
        from tritonvl.handlers.tools.launcher import free_port

        self.port = free_port()
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "naive_server.py"), model_dir,
                                          str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{self.port}/docs")
        self.url, self.stream, self.pid = f"http://127.0.0.1:{self.port}/generate", False, self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        print(f"server log kept: {self.log_path}", flush=True)


class Triton:
    """(B) or (C): the real model repository, with the llm backend chosen by parameter."""

    def __init__(self, model_dir: str, backend: str, extra_params: dict | None = None, log_path: str = "",
                 env: dict | None = None) -> None:
        """``extra_params``: more llm parameters; ``env``: added to tritonserver's environment."""
        from tritonvl.handlers.tools.launcher import ServerProcess, repository_with

        self.tmp = tempfile.mkdtemp(prefix="tritonvl-bench-")
        self.log_path = log_path or f"/tmp/tritonvl-bench-{backend}.log"  # never inside self.tmp: it outlives it
        try:
            repo = repository_with(Path(self.tmp) / "model_repository",
                                   {"llm": {"backend": backend, **(extra_params or {})}})
            self.server = ServerProcess(model_dir, repo=repo, log_path=self.log_path, env=env).start()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.url = f"http://{self.server.http_url}/v2/models/qwen2_5_vl/generate"
        self.grpc_url = self.server.grpc_url
        self.stream, self.pid = True, self.server.proc.pid

    def stop(self) -> None:
        died = self.server.proc.poll() is not None
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)  # the repository copy; the log stays
        if died:
            print(f"tritonserver died during the run (exit {self.server.proc.returncode}); its log: {self.log_path}\n"
                  + self.server.log_tail(), flush=True)
        print(f"server log kept: {self.log_path}", flush=True)


def inprocess_generate_tpot(model_dir: str, max_tokens: int) -> float:
    """Per-token decode time of transformers' generate() in this process (the latency yardstick)."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = tok("Request 0: describe the history of lighthouses in detail.", return_tensors="pt").input_ids

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False)
            best = min(best, time.perf_counter() - t)
        return best

    return (timed(max_tokens) - timed(1)) / (max_tokens - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--systems", default="A,B,C")
    ap.add_argument("--workloads", default="text,image")
    ap.add_argument("--concurrency", default="1,4,16,32,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--min-requests", type=int, default=8, help="requests per level: max(this, concurrency)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    ap.add_argument("--log-dir", default="/tmp/tritonvl-bench-logs", help="where the servers' logs are kept")
    args = ap.parse_args(argv)
    model_dir = build_model(args.model)
    levels = [int(c) for c in args.concurrency.split(",")]
    results = {"model": args.model, "model_dir": model_dir, "max_tokens": args.max_tokens,
               "machine": f"{os.cpu_count()} CPUs", "runs": []}
    results["inprocess_generate_tpot_ms"] = 1e3 * inprocess_generate_tpot(model_dir, args.max_tokens)
    print(f"in-process generate(): {results['inprocess_generate_tpot_ms']:.2f} ms/token", flush=True)
    logs = {s: lambda s=s: log_file(args.log_dir, f"server-{s}-{args.model}.log") for s in "ABC"}
    makers = {"A": lambda: Naive(model_dir, logs["A"]()), "B": lambda: Triton(model_dir, "generate", log_path=logs["B"]()),
              "C": lambda: Triton(model_dir, "engine", log_path=logs["C"]())}
    offset = 0
    for system in args.systems.split(","):
        server = makers[system]()
        try:
            for workload in args.workloads.split(","):
                # warm-up (first-call overheads are not what we measure)
                asyncio.run(run_load(server.url, bodies(workload, 2, 4, 10**6), 2, server.stream))
                for conc in levels:
                    n = max(args.min_requests, conc)
                    mem = Memory(server.pid)
                    mem.start()
                    records, wall = asyncio.run(run_load(server.url, bodies(workload, n, args.max_tokens, offset),
                                                         conc, server.stream))
                    mem.stop.set()
                    mem.join()
                    offset += n
                    row = {"system": system, "workload": workload, "concurrency": conc,
                           **summarize(records, wall, mem.peak)}
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
        finally:
            server.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-{args.model}.json").write_text(json.dumps(results, indent=1))
    table = report(results)
    (out / f"results-{args.model}.md").write_text(table)
    if plot(results, out) is None:
        print("matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
    print(table)
    return 0


NAMES = {"A": "A naive generate() server", "B": "B Triton + generate()", "C": "C Triton + engine"}


def report(results: dict) -> str:
    runs = results["runs"]
    lines = [f"Model `{results['model']}`, {results['max_tokens']} output tokens per request, "
             f"{results['machine']}. In-process generate(): {results['inprocess_generate_tpot_ms']:.2f} ms/token.", "",
             "| workload | system | conc | out tok/s | req/s | TTFT p50 / p99 ms | per-token p50 / p99 ms | peak RSS MB | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['workload']} | {r['system']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                     f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {r['peak_rss_mb']:.0f} | {r['errors']} |")
    lines += ["", "Ratios of output tokens/s (C over A, C over B):", ""]
    for workload in sorted({r["workload"] for r in runs}):
        for conc in sorted({r["concurrency"] for r in runs}):
            get = {r["system"]: r["output_tokens_per_s"] for r in runs
                   if r["workload"] == workload and r["concurrency"] == conc}
            if "C" in get:
                parts = [f"C/{s} = {get['C'] / get[s]:.1f}x" for s in ("A", "B") if s in get and get[s]]
                lines.append(f"- {workload}, concurrency {conc}: " + ", ".join(parts))
    c1 = [r for r in runs if r["system"] == "C" and r["concurrency"] == 1 and r["workload"] == "text"]
    if c1:
        lines.append(f"- concurrency 1, text: C per-token p50 {c1[0]['tpot_p50_ms']:.2f} ms vs in-process "
                     f"generate() {results['inprocess_generate_tpot_ms']:.2f} ms "
                     f"({c1[0]['tpot_p50_ms'] / results['inprocess_generate_tpot_ms']:.2f}x)")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> Path | None:
    """throughput-<model>.png in ``out``; None (and nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    workloads = sorted({r["workload"] for r in runs})
    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for j, workload in enumerate(workloads):
        for system in sorted({r["system"] for r in runs}):
            rows = sorted((r for r in runs if r["system"] == system and r["workload"] == workload),
                          key=lambda r: r["concurrency"])
            x = [r["concurrency"] for r in rows]
            axes[0][j].plot(x, [r["output_tokens_per_s"] for r in rows], marker="o", label=NAMES[system])
            axes[1][j].plot(x, [r["ttft_p50_ms"] for r in rows], marker="o", label=NAMES[system])
        for i, ylabel in enumerate(["output tokens/s", "TTFT p50 (ms)"]):
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].set_xlabel("concurrency")
            axes[i][j].set_ylabel(ylabel)
            axes[i][j].set_title(f"{results['model']} model, {workload}")
            axes[i][j].grid(True, alpha=0.3)
            axes[i][j].legend()
    fig.tight_layout()
    path = out / f"throughput-{results['model']}.png"
    fig.savefig(path, dpi=90)
    return path


if __name__ == "__main__":
    sys.exit(main())
