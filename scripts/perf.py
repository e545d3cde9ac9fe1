#!/usr/bin/env python3
"""Load-test tritonvl with perf_analyzer: input data, sweeps, CSV/JSON, a compact table.

    # against a live server: images + streaming, concurrency 1..8
    python scripts/perf.py run --url localhost:8001 --mode stream --concurrency 1,2,4,8
    # one response per request, a request-rate sweep, your own images and prompts
    python scripts/perf.py run --mode one --request-rate 1,2,4 --images DIR --prompt "What is this?"
    # one model alone: the vision tower with real pixel values, or the preprocessing step
    python scripts/perf.py run --model vision_encoder --concurrency 1,4,8
    # start a server on a copy of model_repository/ with edited config.pbtxt values
    python scripts/perf.py run --serve tiny --set llm.max_num_seqs=2 --concurrency 1,4
    # the docs/CAPACITY.md run (every variant, plots, tables): scripts/capacity_report.py

The ensemble is decoupled, so it is always driven with `-i grpc --streaming` (Triton 2.51 refuses
unary ModelInfer for it); "one" mode sends `stream=false` (one response per request), "stream" mode
`stream=true`. perf_analyzer's p50/p90/p99 are request latency up to the final response, in stream
mode too (2.51 prints "using the first response for measuring latency", yet its figures match the
last response's timestamps in its own profile export). First-response latency (TTFT), inter-token
latency and output tokens/s are computed here from that --profile-export-file.
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ENSEMBLE = "qwen2_5_vl"
PER_MODEL = ("preprocess", "vision_encoder")  # not decoupled: plain gRPC ModelInfer
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
PROMPTS = ["Describe this image.", "What objects are in the picture?", "What colours dominate this image?",
           "Write a one-line caption for this picture.", "Is there any text in this image?"]


# ---- input data ------------------------------------------------------------------------------

def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """`n` distinct smooth-noise JPEGs (distinct content: no cache sees the same image twice in a row)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def folder_images(folder: str) -> list[bytes]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"perf.py: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return [p.read_bytes() for p in files]


def groups(images: list[bytes], per_request: int, n: int) -> list[list[bytes]]:
    """`n` requests' image lists, taking the images in order and wrapping around."""
    if per_request == 0 or not images:
        return [[] for _ in range(n)]
    return [[images[(i * per_request + j) % len(images)] for j in range(per_request)] for i in range(n)]


def tensor(values: list, shape: list[int] | None = None) -> dict:
    return {"content": values, "shape": shape or [len(values)]}


def request_data(image_groups: list[list[bytes]], prompts: list[str], max_tokens: int, stream: bool,
                 ignore_eos: bool) -> dict:
    """perf_analyzer --input-data for the ensemble (or `preprocess`): images as base64 BYTES elements."""
    data = []
    for i, imgs in enumerate(image_groups):
        entry = {"text_input": tensor([prompts[i % len(prompts)]]), "max_tokens": tensor([max_tokens]),
                 "stream": tensor([stream]), "exclude_input_in_output": tensor([True])}
        if ignore_eos:  # fixed-length answers: runs compare like with like
            entry["ignore_eos"] = tensor([True])
        if imgs:
            entry["image"] = tensor([base64.b64encode(b).decode() for b in imgs])
        data.append(entry)
    return {"data": data}


def encoder_data(image_groups: list[list[bytes]], model_dir: str) -> dict:
    """--input-data for `vision_encoder`: pixel values from the model's own image processor."""
    from PIL import Image

    from tritonvl.handlers.preprocess.preprocessor import Preprocessor

    pre = Preprocessor(model_dir)
    data = []
    for imgs in image_groups:
        pixels, grid = pre.pixels([Image.open(io.BytesIO(b)).convert("RGB") for b in imgs])
        data.append({"pixel_values": {"b64": base64.b64encode(pixels.tobytes()).decode(), "shape": list(pixels.shape)},
                     "image_grid_thw": tensor(grid.reshape(-1).tolist(), list(grid.shape))})
    return {"data": data}


# ---- perf_analyzer -----------------------------------------------------------------------------

def perf_analyzer_env() -> tuple[str, dict]:
    """The perf_analyzer binary and an environment where it finds libcudart (scripts/env.sh, in Python)."""
    binary = shutil.which("perf_analyzer") or str(Path(sysconfig.get_path("scripts")) / "perf_analyzer")
    if not Path(binary).is_file():
        raise SystemExit("perf.py: no perf_analyzer: pip install 'tritonclient[all]==2.51.0' (scripts/setup.sh)")
    env = dict(os.environ)
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    if spec and spec.submodule_search_locations:
        lib = str(Path(next(iter(spec.submodule_search_locations))) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
    return binary, env


def parse_stdout(text: str) -> dict:
    """Server-side figures per model (the ensemble's composing models too): batch, queue, compute."""
    stats, name, out = {}, None, {}
    for line in text.splitlines():
        if re.match(r"\s*Server:\s*$", line):
            name = "server"
        elif m := re.match(r"\s+(\w+), version: \S+", line):
            name = m.group(1)
        elif name and (m := re.search(r"(Inference|Execution) count: (\d+)", line)):
            stats.setdefault(name, {})[m.group(1)] = int(m.group(2))
        elif name and (m := re.search(r"Avg request latency: (\d+) usec \((.*)\)", line)):
            parts = {k.strip(): int(v) for k, v in re.findall(r"([a-z ]+?) (\d+) usec", m.group(2))}
            stats.setdefault(name, {}).update({"latency": int(m.group(1)), **parts})
    for model, s in stats.items():
        if model == "server":
            continue
        if s.get("Execution"):
            out[f"{model}_batch"] = round(s["Inference"] / s["Execution"], 2)
        out[f"{model}_queue_ms"] = s.get("queue", 0) / 1e3
        out[f"{model}_infer_ms"] = s.get("compute infer", s.get("compute", 0)) / 1e3
    if "server" in stats and stats["server"].get("Execution"):
        out["server_batch"] = round(stats["server"]["Inference"] / stats["server"]["Execution"], 2)
        out["server_queue_ms"] = stats["server"].get("queue", 0) / 1e3
        out["server_infer_ms"] = stats["server"].get("compute infer", stats["server"].get("compute", 0)) / 1e3
    return out


def server_counts(url: str) -> dict[str, dict[str, int]]:
    """Triton's statistics of every loaded model (gRPC): requests, executions, queue and compute ns."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(as_json=True)
    out = {}
    for m in stats.get("model_stats", []):
        inf = m.get("inference_stats", {})
        out[m["name"]] = {"Inference": int(m.get("inference_count", 0)), "Execution": int(m.get("execution_count", 0)),
                          "queue_ns": int(inf.get("queue", {}).get("ns", 0)),
                          "compute_ns": int(inf.get("compute_infer", {}).get("ns", 0))}
    return out


def composing_figures(before: dict, after: dict, row: dict) -> dict:
    """Batch, queue and compute per step model over one run, from the statistics API: perf_analyzer
    breaks them out for an ensemble only, and the public model is a BLS front (docs/CANCELLATION.md)."""
    out = {}
    for model in ("preprocess", "vision_encoder", "llm"):
        a, b = after.get(model), before.get(model, {})
        if a is None or f"{model}_batch" in row:
            continue
        n, e = a["Inference"] - b.get("Inference", 0), a["Execution"] - b.get("Execution", 0)
        if e > 0:
            out[f"{model}_batch"] = round(n / e, 2)
            out[f"{model}_queue_ms"] = (a["queue_ns"] - b.get("queue_ns", 0)) / n / 1e6
            out[f"{model}_infer_ms"] = (a["compute_ns"] - b.get("compute_ns", 0)) / n / 1e6
    return out


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


def parse_export(path: Path) -> dict:
    """First-response, end-to-end and inter-token latency and output tokens/s from the profile export."""
    exp = json.loads(path.read_text())["experiments"][0]
    ttft, e2e, itl, tokens = [], [], [], 0
    for r in exp["requests"]:
        ts = r.get("response_timestamps") or []
        if not ts:
            continue
        ttft.append((ts[0] - r["timestamp"]) / 1e6)
        e2e.append((ts[-1] - r["timestamp"]) / 1e6)
        outs = r.get("response_outputs") or [{}]
        n = outs[-1].get("num_output_tokens", 0)
        n = int(n[0] if isinstance(n, list) else n)
        tokens += n
        if n > 1:
            itl.append((ts[-1] - ts[0]) / 1e6 / (n - 1))
    bounds = exp.get("window_boundaries") or []
    seconds = (bounds[-1] - bounds[0]) / 1e9 if len(bounds) > 1 else float("nan")
    return {"requests": len(e2e), "output_tokens_per_s": round(tokens / seconds, 1) if seconds else float("nan"),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "e2e_p50_ms": pct(e2e, 50), "e2e_p90_ms": pct(e2e, 90), "e2e_p99_ms": pct(e2e, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


def measure(args, data_file: Path, load: str, level: float, work: Path) -> dict:
    """One perf_analyzer run at one concurrency / request rate; returns one row."""
    binary, env = perf_analyzer_env()
    tag = "-".join(x for x in (args.label, args.model, args.mode, f"{load}{level:g}") if x)
    report, export = work / f"{tag}.csv", work / f"{tag}-export.json"
    cmd = [binary, "-m", args.model, "-u", args.url, "-i", "grpc", "--input-data", str(data_file), "-f", str(report),
           f"--{load.replace('_', '-')}-range", f"{level:g}", "--max-threads", str(max(16, int(level)))]
    if args.model not in PER_MODEL:
        cmd += ["--streaming", "--profile-export-file", str(export)]  # exports of tensor outputs are huge
    window = (["--request-count", str(args.request_count)] if args.request_count else
              ["-p", str(args.measurement_interval), "-s", str(args.stability), "-r", str(args.max_trials)])
    row = {"model": args.model, "mode": args.mode, "load": load, "level": level, "stable": True}
    before = server_counts(args.url)
    proc = subprocess.run(cmd + window, check=False, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 and "stable" in proc.stdout + proc.stderr and not args.request_count:
        # a noisy machine: one measurement over a fixed number of requests rather than nothing
        row["stable"] = False
        count = ["--request-count", str(max(24, 4 * int(level)))]
        proc = subprocess.run(cmd + count, check=False, env=env, capture_output=True, text=True, timeout=args.timeout)
    (work / f"{tag}.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0 or not report.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {**row, "error": " | ".join(tail) or f"perf_analyzer exited {proc.returncode}"}
    with open(report) as f:
        pa = next(csv.DictReader(f))
    row |= {"infer_per_s": float(pa["Inferences/Second"]),
            "responses_per_s": float(pa.get("Response Throughput") or pa["Inferences/Second"]),
            **{f"latency_{p}_ms": int(pa[f"{p} latency"]) / 1e3 for p in ("p50", "p90", "p95", "p99")}}
    row |= parse_stdout(proc.stdout)
    row |= composing_figures(before, server_counts(args.url), row)
    if export.is_file():
        row |= parse_export(export)
        export.unlink()  # it repeats every request's inputs (base64 images): large, and summarized above
    return row


def levels(spec: str) -> list[float]:
    """'1,2,4' or perf_analyzer's 'start:end:step'."""
    if ":" in spec:
        start, end, *step = (float(x) for x in spec.split(":"))
        step = step[0] if step else 1.0
        return [start + i * step for i in range(math.floor((end - start) / step + 1e-9) + 1)]
    return [float(x) for x in spec.split(",") if x]


# ---- a server on an edited copy of model_repository/ -------------------------------------------

def start_server(serve: str | None, settings: list[str], log: Path):
    """A tritonserver (handlers/tools/launcher.py) on a temporary copy of model_repository/ with
    `settings` (`MODEL.KEY=VALUE`, as `tritonvl serve --set`) applied; stop() removes the copy."""
    from tritonvl.handlers.params import ParamError
    from tritonvl.handlers.tools.launcher import ServerProcess
    from tritonvl.handlers.tools.repository import parse_sets

    try:
        overrides = parse_sets(settings)
    except ParamError as exc:
        raise SystemExit(f"perf.py: --set: {exc}") from None
    log.parent.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(default_model_dir(serve), overrides=overrides, log_path=str(log), ready_timeout=600)
    try:
        return server.start()
    except RuntimeError as exc:
        raise SystemExit(f"perf.py: {exc}") from None


def default_model_dir(serve: str | None) -> str:
    if serve and serve != "tiny":
        return serve
    if os.environ.get("TRITONVL_MODEL") and not serve:
        return os.environ["TRITONVL_MODEL"]
    from tritonvl.handlers.tiny_model import ensure_default_model

    return str(ensure_default_model())


# ---- a sweep -------------------------------------------------------------------------------------

def build_data(args, stream: bool, work: Path) -> Path:
    images = (folder_images(args.images) if args.images else
              synthetic_images(args.num_data * max(args.images_per_request, 1), args.image_size))
    n = args.num_data if not args.images else max(math.ceil(len(images) / max(args.images_per_request, 1)), 1)
    image_groups = groups(images, args.images_per_request, n)
    if args.model == "vision_encoder":
        if args.images_per_request == 0:
            raise SystemExit("perf.py: vision_encoder needs images (--images-per-request >= 1)")
        data = encoder_data(image_groups, args.model_dir or default_model_dir(args.serve))
    else:
        data = request_data(image_groups, args.prompt or PROMPTS, args.max_tokens, stream, not args.allow_eos)
    path = work / f"input-{args.model}-{'stream' if stream else 'one'}.json"
    path.write_text(json.dumps(data))
    return path


def sweep(args) -> list[dict]:
    """Every mode x level of `args` against args.url; writes <out>/<label>.csv and .json; prints tables."""
    out = Path(args.out)
    work = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    load = "request_rate" if args.request_rate else "concurrency"
    modes = ["one"] if args.model in PER_MODEL else (["one", "stream"] if args.mode == "both" else [args.mode])
    rows = []
    for mode in modes:
        data_file = build_data(args, mode == "stream", work)
        run = argparse.Namespace(**{**vars(args), "mode": mode})
        if args.warmup:
            warm = {"request_count": args.warmup, "label": "-".join(x for x in (args.label, "warmup") if x)}
            measure(argparse.Namespace(**{**vars(run), **warm}), data_file, "concurrency", 1, work)
        mode_rows = []
        for level in levels(args.request_rate or args.concurrency):
            row = {"label": args.label, **measure(run, data_file, load, level, work)}
            mode_rows.append(row)
            print_rows([row], header=not mode_rows[:-1])
        rows += mode_rows
    name = "-".join(x for x in (args.label, args.model, args.mode, load) if x)
    write_rows(rows, out / f"{name}.csv", out / f"{name}.json")
    return rows


COLUMNS = [("level", "{:>6g}", "  conc"), ("infer_per_s", "{:>8.2f}", " infer/s"),
           ("output_tokens_per_s", "{:>8.1f}", "  tok/s"), ("latency_p50_ms", "{:>8.1f}", "  p50 ms"),
           ("latency_p90_ms", "{:>8.1f}", "  p90 ms"), ("latency_p99_ms", "{:>8.1f}", "  p99 ms"),
           ("ttft_p50_ms", "{:>9.1f}", " TTFT p50"), ("ttft_p99_ms", "{:>9.1f}", " TTFT p99"),
           ("itl_p50_ms", "{:>8.2f}", " ITL p50")]


def print_rows(rows: list[dict], header: bool = True) -> None:
    """Compact rows: p50/p90/p99 = perf_analyzer's request latency; TTFT and ITL (stream mode) from its export."""
    for row in rows:
        per_model = row["model"] in PER_MODEL
        cols = COLUMNS[:2 if per_model else 3] + COLUMNS[3:6] + (COLUMNS[6:] if row["mode"] == "stream" else [])
        if header:
            what = {"one": "one response per request", "stream": "stream, TTFT = first response"}
            unit = "rate" if row["load"] == "request_rate" else "conc"
            print(f"\n{row['model']} [{what[row['mode']] if not per_model else 'plain gRPC'}]"
                  + (f" {row['label']}" if row.get("label") else ""))
            print(" ".join(h.replace("conc", unit) for _, _, h in cols)
                  + ("  batch" if per_model else "") + "  note")
            header = False
        if "error" in row:
            print(f"{row['level']:>6g}  error: {row['error']}")
            continue
        cells = [fmt.format(row.get(k, float("nan"))) for k, fmt, _ in cols]
        if per_model:
            cells.append(f"{row.get('server_batch', float('nan')):>6.2f}")
        print(" ".join(cells) + ("" if row["stable"] else "  unstable: one count-based measurement"), flush=True)


def write_rows(rows: list[dict], csv_path: Path, json_path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1))


def run_command(args) -> int:
    server = None
    if args.serve or args.set:
        server = start_server(args.serve, args.set, Path(args.out) / "server.log")
        args.url = server.grpc_url
    try:
        rows = sweep(args)
    finally:
        if server:
            server.stop()
    return 1 if any("error" in r for r in rows) else 0


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="localhost:8001", help="gRPC HOST:PORT (default: %(default)s)")
    p.add_argument("--model", default=ENSEMBLE, choices=[ENSEMBLE, *PER_MODEL])
    p.add_argument("--mode", choices=["stream", "one", "both"], default="stream",
                   help="stream=true (many responses) or false (one); both: one sweep each (default: stream)")
    p.add_argument("--concurrency", default="1,2,4,8", help="levels: 1,2,4 or start:end:step (default: %(default)s)")
    p.add_argument("--request-rate", help="sweep requests/s instead of concurrency: 1,2,4 or start:end:step")
    p.add_argument("--images", help="folder of images (default: synthetic JPEGs)")
    p.add_argument("--image-size", type=lambda s: tuple(int(x) for x in s.split("x")), default=(448, 336),
                   help="synthetic image WxH (default: 448x336)")
    p.add_argument("--images-per-request", type=int, default=1, help="0 = text only (default: 1)")
    p.add_argument("--num-data", type=int, default=64, help="distinct synthetic requests (default: %(default)s)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable; requests cycle through them)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--allow-eos", action="store_true", help="let answers end early (default: ignore_eos=true)")
    p.add_argument("--measurement-interval", type=int, default=3000, help="window in ms (default: %(default)s)")
    p.add_argument("--stability", type=int, default=50, help="perf_analyzer -s, percent (default: %(default)s)")
    p.add_argument("--max-trials", type=int, default=6, help="perf_analyzer -r (default: %(default)s)")
    p.add_argument("--request-count", type=int, default=0, help="measure exactly N requests per level instead")
    p.add_argument("--warmup", type=int, default=4, help="requests sent before each sweep (default: 4)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per perf_analyzer run")
    p.add_argument("--model-dir", help="model directory for vision_encoder pixel values (default: the served one)")
    p.add_argument("--serve", metavar="MODEL_DIR|tiny", help="start a server on a copy of model_repository/")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="as `tritonvl serve --set` (docs/PARAMETERS.md): llm.max_num_seqs=2, "
                        "vision_encoder.instance_count=2, vision_encoder.max_queue_delay_microseconds=0 "
                        "(implies --serve tiny)")
    p.add_argument("--label", default="", help="name of this run in its output files")
    p.add_argument("--out", default="perf-results", help="output folder (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="one sweep (prints rows; writes CSV/JSON)")
    add_run_options(p)
    p.set_defaults(func=run_command)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
