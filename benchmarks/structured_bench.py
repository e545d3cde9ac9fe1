"""Structured outputs under load: one engine server, concurrency N, no constraints vs half the requests
JSON-schema-constrained, side by side (alternating rounds, so drift on a shared machine hits both).

    python benchmarks/structured_bench.py --model bench --concurrency 32 --requests 64 --rounds 2

Prints a Markdown table: output tokens/s of each workload, their ratio (constrained / none), TTFT and
per-token latency, the tokens per constrained answer, and the grammar compiles the server counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import build_model, summarize  # noqa: E402
from load import run_load  # noqa: E402

# A captioning schema with free-length strings, so constrained answers run about as long as the others
SCHEMA = {"type": "object", "properties": {
    "caption": {"type": "string"},
    "scene": {"type": "string", "enum": ["indoor", "outdoor", "unknown"]},
    "objects": {"type": "array", "items": {"type": "string"}}},
    "required": ["caption", "scene", "objects"]}


def bodies(n: int, max_tokens: int, constrained_every: int, offset: int) -> list[dict]:
    """``constrained_every``: 0 none, 2 every other request (half)."""
    out = []
    for i in range(offset, offset + n):
        body = {"text_input": f"Request {i}: caption this scene as JSON.", "max_tokens": max_tokens,
                "temperature": 1.0, "seed": i, "exclude_input_in_output": True}
        if constrained_every and i % constrained_every == 0:
            body["sampling_parameters"] = json.dumps({"structured_outputs": {"json": SCHEMA}})
        else:
            body["ignore_eos"] = True  # the free answers run to max_tokens
        out.append(body)
    return out


def grammar_metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^tritonvl_(grammar_\w+)\{model="llm"[^}]*\} (\S+)$', text, re.M)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "bench"), default="bench")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each workload, alternating")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="a model parameter for this run's server, as tritonvl serve --set")
    args = ap.parse_args(argv)
    overrides: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        model, _, name = key.partition(".")
        overrides.setdefault(model, {})[name] = value

    from tritonvl.handlers.tools.launcher import ServerProcess

    model = build_model(args.model)
    log_path = "/tmp/tritonvl-structured-bench-server.log"  # kept after the run (overwritten by the next)
    print(f"server log: {log_path}", flush=True)
    with ServerProcess(model, overrides=overrides or None, log_path=log_path) as server:
        url = f"http://{server.http_url}/v2/models/qwen2_5_vl/generate"
        # warm-up: the grammar compiles once here (and xgrammar loads), outside the measured rounds
        asyncio.run(run_load(url, bodies(4, 8, 2, 10**6), 4, False))
        before = grammar_metrics(server.metrics_url)
        runs: dict[str, list] = {"none": [], "half JSON": []}
        for r in range(args.rounds):
            for name, every in (("none", 0), ("half JSON", 2)):
                recs, wall = asyncio.run(run_load(url, bodies(args.requests, args.max_tokens, every,
                                                              r * args.requests), args.concurrency, True))
                runs[name].append((recs, wall))
        after = grammar_metrics(server.metrics_url)
    rows = {}
    for name, results in runs.items():
        records = [rec for recs, _ in results for rec in recs]
        rows[name] = summarize(records, sum(wall for _, wall in results), 0)
    constrained_tokens = [rec.tokens for recs, _ in runs["half JSON"] for i, rec in enumerate(recs)]
    ratio = rows["half JSON"]["output_tokens_per_s"] / rows["none"]["output_tokens_per_s"]
    print(f"model {args.model}, concurrency {args.concurrency}, {args.rounds} x {args.requests} requests per "
          f"workload, max_tokens {args.max_tokens}, temperature 1{', --set ' + ' '.join(args.set) if args.set else ''}\n")
    print("| workload | output tok/s | req/s | TTFT p50 ms | TPOT p50 ms | TPOT p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | {s['ttft_p50_ms']:.0f} | "
              f"{s['tpot_p50_ms']:.1f} | {s['tpot_p99_ms']:.1f} | {s['errors']} |")
    print(f"\nratio (half JSON / none) of output tok/s: {ratio:.2f}")
    print(f"mean tokens per answer in the half-JSON rounds: {sum(constrained_tokens) / len(constrained_tokens):.1f}")
    compiled = {k: after.get(k, 0) - before.get(k, 0) for k in ("grammar_cache_misses_total",
                                                                 "grammar_cache_hits_total")}
    print(f"grammar compiles during the measured rounds: {compiled['grammar_cache_misses_total']:.0f} "
          f"(cache hits {compiled['grammar_cache_hits_total']:.0f})")
    if any(s["errors"] for s in rows.values()):
        print("first error:", next(s["first_error"] for s in rows.values() if s["errors"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
