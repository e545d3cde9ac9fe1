#!/usr/bin/env python3
"""The docs/CAPACITY.md run: every variant of the model repository (scripts/perf.py sweeps on a
server started with `--set` values), then plots and tables under docs/capacity/.

    python scripts/capacity_report.py --doc docs/CAPACITY.md      # about 20 minutes
    python scripts/capacity_report.py --only encoder-x2 --doc docs/CAPACITY.md   # redo one variant
    python scripts/capacity_report.py --replot --doc docs/CAPACITY.md            # no runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from perf import ENSEMBLE, PER_MODEL, ROOT, add_run_options, default_model_dir, start_server, sweep

# perf_analyzer replays a finite data set: with the caches on, repeats become embedding-cache and
# prefix-cache hits. The report measures cold requests unless a variant says otherwise.
COLD = ["vision_encoder.embedding_cache_bytes=0", "llm.enable_prefix_caching=false"]


def kv_cache_bytes(model_dir: str, blocks: int, block_size: int = 16, dtype_bytes: int = 4) -> int:
    """Bytes of `blocks` KV blocks of this model (fp32 on the CPU)."""
    from tritonvl.handlers.modelinfo import load_model_info

    return load_model_info(model_dir).kv_bytes_per_token(dtype_bytes) * block_size * blocks


def variants(model_dir: str) -> list[tuple[str, str, list[str], list[tuple[str, str, str]]]]:
    """(name, what it changes, --set values, runs as (model, mode, load))."""
    stream, enc = (ENSEMBLE, "stream", "concurrency"), ("vision_encoder", "one", "concurrency")
    return [
        ("baseline", "model_repository/ as shipped, caches off", COLD,
         [stream, (ENSEMBLE, "one", "concurrency"), (ENSEMBLE, "stream", "request_rate"),
          ("preprocess", "one", "concurrency")]),
        ("caches-on", "as shipped: embedding cache and prefix caching on (replayed inputs hit them)", [], [stream]),
        ("max_num_seqs=2", "llm max_num_seqs 64 -> 2", COLD + ["llm.max_num_seqs=2"], [stream]),
        ("kv=24-blocks", "llm KV budget 1 GiB -> 24 blocks of 16 tokens",
         COLD + [f"llm.kv_cache_bytes={kv_cache_bytes(model_dir, 24)}"], [stream]),
        ("preprocess-x1", "preprocess instances 2 -> 1", COLD + ["preprocess.instance_count=1"], [stream]),
        ("encoder-shipped", "vision_encoder as shipped: max_queue_delay 2000 us, 1 instance", COLD, [enc]),
        ("encoder-delay-0", "vision_encoder max_queue_delay 2000 us -> 0",
         COLD + ["vision_encoder.max_queue_delay_microseconds=0"], [enc]),
        ("encoder-delay-20ms", "vision_encoder max_queue_delay 2000 us -> 20000",
         COLD + ["vision_encoder.max_queue_delay_microseconds=20000"], [enc]),
        ("encoder-x2", "vision_encoder instances 1 -> 2", COLD + ["vision_encoder.instance_count=2"], [enc]),
    ]


def run_capacity(args) -> int:
    out = Path(args.out)
    model_dir = args.model_dir or default_model_dir(args.serve)
    args.model_dir = model_dir
    only = set(args.only.split(",")) if args.only else None
    all_path = out / "all.json"
    keep = all_path.is_file() and (only or args.replot)
    rows = [r for r in (json.loads(all_path.read_text()) if keep else []) if not only or r["label"] not in only]
    for name, _, settings, runs in variants(model_dir):
        if args.replot or (only and name not in only):
            continue
        print(f"\n== {name}: --set {' '.join(settings) or '(none)'}", flush=True)
        server = start_server(args.serve, settings, out / "logs" / f"server-{name}.log")
        try:
            for model, mode, load in runs:
                run = argparse.Namespace(**{**vars(args), "url": server.grpc_url, "model": model, "mode": mode,
                                            "label": name, "concurrency": args.levels,
                                            "request_rate": args.rates if load == "request_rate" else None})
                rows += sweep(run)
        finally:
            server.stop()
            for data in (out / "logs").glob("input-*.json"):
                data.unlink()  # up to ~100 MB of pixel values: rebuilt by the command
    all_path.write_text(json.dumps(rows, indent=1))
    plot_capacity(rows, out)
    tables = capacity_tables(rows, model_dir, args)
    (out / "results.md").write_text(tables)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        begin, end = "<!-- results:begin -->", "<!-- results:end -->"
        doc.write_text(text[:text.index(begin) + len(begin)] + "\n" + tables + text[text.index(end):])
    return 0


def table(rows: list[dict]) -> list[str]:
    per_model = rows[0]["model"] in PER_MODEL
    unit = "req/s offered" if rows[0]["load"] == "request_rate" else "concurrency"
    if per_model:
        head = f"| {unit} | infer/s | p50 / p90 / p99 ms | batch | queue ms | compute ms |"
        cells = [lambda r: f"{r['infer_per_s']:.1f}",
                 lambda r: f"{r['latency_p50_ms']:.1f} / {r['latency_p90_ms']:.1f} / {r['latency_p99_ms']:.1f}",
                 lambda r: f"{r.get('server_batch', float('nan')):.2f}",
                 lambda r: f"{r.get('server_queue_ms', float('nan')):.1f}",
                 lambda r: f"{r.get('server_infer_ms', float('nan')):.1f}"]
    else:
        head = (f"| {unit} | req/s | out tok/s | latency p50 / p90 / p99 ms | TTFT p50 / p99 ms | ITL p50 ms "
                "| batch pre / enc |")
        cells = [lambda r: f"{r['infer_per_s']:.2f}", lambda r: f"{r.get('output_tokens_per_s', float('nan')):.0f}",
                 lambda r: f"{r['latency_p50_ms']:.0f} / {r['latency_p90_ms']:.0f} / {r['latency_p99_ms']:.0f}",
                 lambda r: f"{r.get('ttft_p50_ms', float('nan')):.0f} / {r.get('ttft_p99_ms', float('nan')):.0f}"
                 if r["mode"] == "stream" else "-",
                 lambda r: f"{r.get('itl_p50_ms', float('nan')):.1f}" if r["mode"] == "stream" else "-",
                 lambda r: f"{r.get('preprocess_batch', float('nan')):.2f} / "
                           f"{r.get('vision_encoder_batch', float('nan')):.2f}"]
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mark = "" if r["stable"] else " *"
        if "error" in r:
            lines.append(f"| {r['level']:g} | error: {r['error']} |")
        else:
            lines.append(f"| {r['level']:g}{mark} | " + " | ".join(c(r) for c in cells) + " |")
    return lines


def capacity_tables(rows: list[dict], model_dir: str, args) -> str:
    about = {name: (what, settings) for name, what, settings, _ in variants(model_dir)}
    intro = (f"Generated by `python scripts/capacity_report.py --doc docs/CAPACITY.md` on {os.cpu_count()} CPUs "
             f"({time.strftime('%Y-%m-%d')}): model `{Path(model_dir).name}`, one {args.image_size[0]}x"
             f"{args.image_size[1]} JPEG and {args.max_tokens} output tokens per request, {args.num_data} distinct "
             f"requests replayed, {args.measurement_interval} ms windows. `*` = no stable windows: one measurement "
             "over a fixed request count (max(24, 4 x concurrency)) instead.")
    lines = [intro, ""]
    groups_ = {}
    for r in rows:
        groups_.setdefault((r["label"], r["model"], r["mode"], r["load"]), []).append(r)
    for (label, model, mode, load), rs in groups_.items():
        what, settings = about.get(label, ("", []))
        lines += [f"**{label}** ({what}): `{model}`, "
                  + ("plain gRPC" if model in PER_MODEL else f"{mode} mode") + f", {load.replace('_', ' ')} sweep"
                  + (f"; `--set {' '.join(settings)}`" if settings else ""), ""]
        lines += table(rs) + [""]
    lines += ["Plots: [ensemble](capacity/ensemble.png), [modes and request rate](capacity/modes.png), "
              + "[per model](capacity/per-model.png).", ""]
    return "\n".join(lines)


def plot_capacity(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pick(label=None, model=ENSEMBLE, mode=None, load="concurrency"):
        return [r for r in rows if "error" not in r and r["model"] == model and r["load"] == load
                and (label is None or r["label"] == label) and (mode is None or r["mode"] == mode)]

    def finish(ax, **kw):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, **kw)

    def curve(ax, rs, x, y, label, annotate=False):
        if not rs:
            return
        ax.plot([r.get(x, np.nan) for r in rs], [r.get(y, np.nan) for r in rs], marker="o", label=label)
        if annotate:
            for r in rs:
                ax.annotate(f"{r['level']:g}", (r.get(x, np.nan), r.get(y, np.nan)), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))

    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label in labels:
        rs = pick(label, mode="stream")
        curve(axes[0], rs, "output_tokens_per_s", "ttft_p50_ms", label, label == "baseline")
        curve(axes[1], rs, "infer_per_s", "latency_p90_ms", label, label == "baseline")
    for ax, (xl, yl) in zip(axes, [("output tokens/s", "first response (TTFT) p50, ms"),
                                   ("requests/s", "request latency p90, ms")]):
        ax.set(xlabel=xl, ylabel=yl, yscale="log")
        finish(ax)
    fig.suptitle(f"{ENSEMBLE}, stream mode, concurrency sweep per variant (point labels: baseline's concurrency)")
    fig.tight_layout()
    fig.savefig(out / "ensemble.png", dpi=90)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    curve(axes[0], pick("baseline", mode="stream"), "infer_per_s", "latency_p50_ms", "stream: latency p50", True)
    curve(axes[0], pick("baseline", mode="stream"), "infer_per_s", "ttft_p50_ms", "stream: TTFT p50")
    curve(axes[0], pick("baseline", mode="one"), "infer_per_s", "latency_p50_ms", "one response: latency p50", True)
    axes[0].set(xlabel="requests/s", ylabel="ms", title="baseline: stream vs one response (labels: concurrency)")
    rs = pick("baseline", load="request_rate")
    curve(axes[1], rs, "level", "ttft_p50_ms", "TTFT p50")
    curve(axes[1], rs, "level", "latency_p50_ms", "latency p50")
    ax2 = axes[1].twinx()
    ax2.plot([r["level"] for r in rs], [r["infer_per_s"] for r in rs], "k--", marker="x", label="achieved req/s")
    ax2.set_ylabel("achieved requests/s (dashed)")
    axes[1].set(xlabel="offered requests/s", ylabel="ms", title="baseline, stream mode, request-rate sweep")
    for ax in axes:
        finish(ax, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "modes.png", dpi=90)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label in labels:
        curve(axes[0], pick(label, model="vision_encoder"), "infer_per_s", "latency_p50_ms", label, True)
    curve(axes[1], pick("baseline", model="preprocess"), "infer_per_s", "latency_p50_ms", "baseline", True)
    for ax, model in zip(axes, PER_MODEL[::-1]):
        ax.set(xlabel="inferences/s", ylabel="p50 latency, ms", title=f"{model} alone (labels: concurrency)",
               yscale="log")
        finish(ax)
    fig.tight_layout()
    fig.savefig(out / "per-model.png", dpi=90)
    plt.close("all")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--levels", default="1,2,4,8,16")
    p.add_argument("--rates", default="2,4,6,8")
    p.add_argument("--only", help="comma-separated variant names to (re)run; the others are kept")
    p.add_argument("--doc", help="Markdown file whose results section to regenerate")
    p.add_argument("--replot", action="store_true", help="no runs: plots and tables from <out>/all.json")
    p.set_defaults(out=str(ROOT / "docs" / "capacity"), measurement_interval=2000, max_trials=4)
    return run_capacity(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
