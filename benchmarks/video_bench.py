"""Video beside image on one server: TTFT and output tokens/s of text+image and text+video requests
(gRPC streaming, the `bench` preset), at concurrency 1 and 8, and a video's cold / warm TTFT.

    python benchmarks/video_bench.py                        # 320x240: a PNG, a 4 s and a 10 s MP4 (2 fps)
    python benchmarks/video_bench.py --concurrency 1,8 --requests 16 --set preprocess.video_fps=1

Every request of a load run carries its own image or clip (no cache hits); all are made before the
clock starts. Visual tokens are the server's `num_image_tokens` (image and video rows of the vision
tower). Per request, Triton's statistics give the time in the preprocess step (video: container
decode, sampled frames to RGB, resize, patchify) and in the vision encoder; the rest of the TTFT is
the hops, queues and the LLM's prefill. Cold / warm: at concurrency 1, a new clip (both caches miss), the same clip
after other text (the embedding cache hits, the prefix cache cannot: the prompt differs before the
video) and the same request again (both hit). Writes docs/bench/results-video.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
sys.path[1:1] = [str(ROOT / "scripts"), str(ROOT / "tests")]
from bench import build_model, make_image, pct  # noqa: E402
from load import Record, run_grpc_load  # noqa: E402
from perf import composing_figures, server_counts  # noqa: E402
from videos import make_video  # noqa: E402

PROMPT = "Request {i}: describe what you see in detail."
SOURCE_FPS = 10  # the clips' own frame rate; the server samples them at video_fps (2 by default)


def visual(kind: str, seed: int, size: tuple[int, int]) -> dict:
    """The visual input of one request: ``image`` or ``video<seconds>s`` (e.g. video4s)."""
    w, h = size
    if kind == "image":
        return {"image": make_image(seed, w, h)}
    seconds = float(kind.removeprefix("video").removesuffix("s"))
    return {"video": make_video(n=int(seconds * SOURCE_FPS), width=w, height=h, fps=SOURCE_FPS, seed=seed)}


def body(i: int, max_tokens: int, **fields) -> dict:
    return {"text_input": PROMPT.format(i=i), "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, **fields}


def summary(records: list[Record], wall: float) -> dict:
    ok = [r for r in records if r.ok]
    stream_rate = [(r.tokens - 1) / (r.latency - r.ttft) for r in ok if r.tokens > 1 and r.latency > r.ttft]
    return {"requests": len(records), "errors": len(records) - len(ok),
            "visual_tokens": max((r.image_tokens for r in ok), default=0),
            "prompt_tokens": max((r.input_tokens for r in ok), default=0),
            "ttft_p50_ms": 1e3 * pct([r.ttft for r in ok], 50), "ttft_p90_ms": 1e3 * pct([r.ttft for r in ok], 90),
            "stream_tok_s_p50": pct(stream_rate, 50), "total_tok_s": sum(r.tokens for r in ok) / wall,
            "first_error": next((r.error for r in records if not r.ok), "")}


def measured(grpc_url: str, bodies: list[dict], concurrency: int) -> dict:
    """One closed-loop run with the per-step compute Triton counted during it."""
    before = server_counts(grpc_url)
    records, wall = asyncio.run(run_grpc_load(grpc_url, bodies, concurrency))
    steps = composing_figures(before, server_counts(grpc_url), {})
    return {**summary(records, wall), "preprocess_ms": steps.get("preprocess_infer_ms", float("nan")),
            "encoder_ms": steps.get("vision_encoder_infer_ms", float("nan"))}


def counter(metrics_url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"tritonvl_{name}{{"))


def cold_warm(server, kind: str, size: tuple[int, int], rounds: int, max_tokens: int) -> dict:
    """Median TTFT of a new clip, the same clip after other text, and the same request again."""
    out: dict[str, list] = {"cold": [], "warm (embedding cache)": [], "warm (embedding + prefix cache)": []}
    hits0 = counter(server.metrics_url, "image_cache_hits_total")
    prefix0 = counter(server.metrics_url, "prefix_cache_hit_tokens_total")
    for r in range(rounds):
        clip = visual(kind, 50_000 + r, size)
        for phase, lead in zip(out, ("first", "second", "second")):
            content = [{"type": "text", "text": f"{lead} look, round {r}."}, {"type": "video"},
                       {"type": "text", "text": "Describe the video."}]
            fields = body(0, max_tokens, **clip, text_input="", messages=json.dumps(
                [{"role": "user", "content": content}]))
            row = measured(server.grpc_url, [fields], 1)
            if row["errors"]:
                raise RuntimeError(f"cold/warm request failed: {row['first_error']}")
            out[phase].append(row)
    res = {phase: {k: statistics.median(row[k] for row in rows) for k in ("ttft_p50_ms", "preprocess_ms", "encoder_ms")}
           for phase, rows in out.items()}
    res["encoder_cache_hits"] = counter(server.metrics_url, "image_cache_hits_total") - hits0
    res["prefix_cache_hit_tokens"] = counter(server.metrics_url, "prefix_cache_hit_tokens_total") - prefix0
    return res


def report(res: dict) -> str:
    lines = [f"Model `{res['model']}`, {res['max_tokens']} output tokens per request (`ignore_eos`), greedy, "
             f"gRPC streaming, {res['machine']}; visuals {res['size']}, clips {SOURCE_FPS} fps MP4 sampled at the "
             f"server's video_fps{' (' + ' '.join(res['set']) + ')' if res['set'] else ''}.", "",
             "| workload | visual tokens | prompt tokens | conc | requests | TTFT p50 / p90 ms | tok/s per stream p50 "
             "| tok/s total | in preprocess ms | in encoder ms | rest of TTFT p50 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        rest = r["ttft_p50_ms"] - r["preprocess_ms"] - r["encoder_ms"]
        lines.append(f"| {r['workload']} | {r['visual_tokens']} | {r['prompt_tokens']} | {r['concurrency']} | "
                     f"{r['requests']} | {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} | {r['stream_tok_s_p50']:.1f} "
                     f"| {r['total_tok_s']:.1f} | {r['preprocess_ms']:.0f} | {r['encoder_ms']:.0f} | {rest:.0f} | "
                     f"{r['errors']} |")
    lines += ["", "tok/s per stream: (tokens - 1) / (latency - TTFT) of each request; total: all output tokens / wall "
              "time. In preprocess / encoder: mean time a request spent in that step's execution (Triton's "
              "statistics; a batched execution counts in full for each request in it, so under load this is "
              "latency, not a CPU share). Rest: the hops, queues and the LLM's prefill (under load, also other "
              "sequences' steps).", "", "Video / image ratios (same concurrency):", ""]
    image = {r["concurrency"]: r for r in res["runs"] if r["workload"] == "image"}
    for r in res["runs"]:
        base = image.get(r["concurrency"])
        if r["workload"] == "image" or base is None or not base["total_tok_s"]:
            continue
        lines.append(f"- {r['workload']}, concurrency {r['concurrency']}: visual tokens "
                     f"{r['visual_tokens'] / max(base['visual_tokens'], 1):.1f}x, TTFT p50 "
                     f"{r['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}x, tok/s per stream "
                     f"{r['stream_tok_s_p50'] / base['stream_tok_s_p50']:.2f}x, tok/s total "
                     f"{r['total_tok_s'] / base['total_tok_s']:.2f}x")
    cw = res.get("cold_warm")
    if cw:
        lines += ["", f"{res['cold_warm_kind']} at concurrency 1, median of {res['cold_warm_rounds']} clips "
                      f"(encoder cache hits counted: {cw['encoder_cache_hits']:.0f}, prefix-cache hit tokens: "
                      f"{cw['prefix_cache_hit_tokens']:.0f}):", "",
                  "| phase | TTFT ms | in preprocess ms | in encoder ms | TTFT / cold |", "|---|---|---|---|---|"]
        cold = cw["cold"]["ttft_p50_ms"]
        for phase, v in cw.items():
            if isinstance(v, dict):
                lines.append(f"| {phase} | {v['ttft_p50_ms']:.0f} | {v['preprocess_ms']:.0f} | {v['encoder_ms']:.0f} "
                             f"| {v['ttft_p50_ms'] / cold:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tritonvl.handlers.tools.launcher import ServerProcess
    from tritonvl.handlers.tools.repository import parse_sets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "bench"), default="bench")
    ap.add_argument("--workloads", default="image,video4s,video10s", help="image and/or video<seconds>s")
    ap.add_argument("--size", default="320x240", help="WxH of the image and of the clips' frames")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=0, help="requests per run; 0: max(4, 2 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cold-warm", default="video4s", help="the video workload of the cold/warm runs ('' skips)")
    ap.add_argument("--cold-warm-rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="a model parameter for this run's server, as tritonvl serve --set")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="where results-video.{json,md} go ('' skips)")
    args = ap.parse_args(argv)
    size = tuple(int(x) for x in args.size.split("x"))
    levels = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    res = {"model": args.model, "max_tokens": args.max_tokens, "size": args.size, "set": args.set,
           "machine": f"{os.cpu_count()} CPUs", "runs": []}
    # every request's visual, made before the server starts (encoding clips is not what we measure)
    plan, seed = [], 0
    for workload in workloads:
        for conc in levels:
            n = args.requests or max(4, 2 * conc)
            plan.append((workload, conc, [body(seed + i, args.max_tokens, **visual(workload, seed + i, size))
                                          for i in range(n)]))
            seed += n
    warmup = [body(10**6 + i, 4, **visual(w, 10**6 + i, size)) for i, w in enumerate(workloads)]
    model_dir = build_model(args.model)
    with ServerProcess(model_dir, overrides=parse_sets(args.set) or None,
                       log_path="/tmp/tritonvl-video-bench-server.log") as server:
        asyncio.run(run_grpc_load(server.grpc_url, warmup, 1))  # first-call costs (PyAV, torch) are not measured
        for workload, conc, bodies in plan:
            row = {"workload": workload, "concurrency": conc, **measured(server.grpc_url, bodies, conc)}
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
        if args.cold_warm:
            res.update(cold_warm_kind=args.cold_warm, cold_warm_rounds=args.cold_warm_rounds,
                       cold_warm=cold_warm(server, args.cold_warm, size, args.cold_warm_rounds, args.max_tokens))
    table = report(res)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results-video.json").write_text(json.dumps(res, indent=1))
        (out / "results-video.md").write_text(table)
    return 1 if any(r["errors"] for r in res["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
