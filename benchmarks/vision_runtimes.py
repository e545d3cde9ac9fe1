#!/usr/bin/env python3
"""vision_encoder alone, runtime=torch vs runtime=onnxruntime, images/s side by side (docs/ONNX.md).

Each runtime gets its own tritonserver (a copy of model_repository/ with `--set`), the same model and
the same pixel values, driven by scripts/perf.py's per-model run (perf_analyzer, plain gRPC). The
embedding cache is off so that every request runs the tower.

    python benchmarks/vision_runtimes.py                       # the "bench" random model, CPU
    python benchmarks/vision_runtimes.py --serve /models/Qwen2.5-VL-3B-Instruct --concurrency 1,8
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("torch", "onnxruntime")


def load_perf():
    spec = importlib.util.spec_from_file_location("perf", ROOT / "scripts" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf)
    return perf


def bench_model(out: Path) -> str:
    """The "bench" preset with a larger pixel budget (448x336 images -> 768 patches each)."""
    from tritonvl.handlers.tiny_model import PRESETS, build_tiny_model

    if not (out / "model.safetensors").is_file():
        build_tiny_model(out, {**PRESETS["bench"], "max_pixels": 1024 * 28 * 28})
    return str(out)


def main(argv: list[str] | None = None) -> int:
    perf = load_perf()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    perf.add_run_options(p)
    p.set_defaults(model="vision_encoder", concurrency="1,4", out="perf-results/vision-runtimes", num_data=32)
    args = p.parse_args(argv)
    args.model = "vision_encoder"
    if not args.serve:
        args.serve = bench_model(Path(args.out) / "bench-model")
    rows = {}
    for runtime in RUNTIMES:
        run = argparse.Namespace(**{**vars(args), "label": runtime,
                                    "set": [*args.set, f"vision_encoder.runtime={runtime}",
                                            "vision_encoder.embedding_cache_bytes=0"]})
        server = perf.start_server(run.serve, run.set, Path(args.out) / f"server-{runtime}.log")
        run.url = server.grpc_url
        try:
            rows[runtime] = {r["level"]: r for r in perf.sweep(run)}
        finally:
            server.stop()
    per_request = max(args.images_per_request, 1)
    print(f"\nvision_encoder, {args.image_size[0]}x{args.image_size[1]} images, {per_request} per request, "
          f"cache off: images/s (p50 ms)")
    print(f"{'conc':>5} " + " ".join(f"{r:>20}" for r in RUNTIMES) + "   onnx/torch")
    for level in perf.levels(args.concurrency):
        cells, speeds = [], []
        for runtime in RUNTIMES:
            row = rows[runtime].get(level, {})
            if "infer_per_s" not in row:
                cells.append(f"{'error':>20}")
                continue
            speeds.append(row["infer_per_s"] * per_request)
            cells.append(f"{speeds[-1]:>11.2f} ({row['latency_p50_ms']:>6.1f})")
        ratio = f"{speeds[1] / speeds[0]:>9.2f}x" if len(speeds) == 2 else ""
        print(f"{level:>5g} " + " ".join(cells) + "  " + ratio)
    return 0 if all("error" not in r for rs in rows.values() for r in rs.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
