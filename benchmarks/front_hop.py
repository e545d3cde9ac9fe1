"""What the public BLS front costs over the ensemble: one server, both models, interleaved.

    python benchmarks/front_hop.py --model bench --concurrency 1,32 --rounds 3

Same requests (streamed over HTTP SSE, text workload, greedy, ignore_eos) to `qwen2_5_vl` (front)
and `qwen2_5_vl_ensemble`, alternating which goes first each round, so machine noise hits both.
Prints output tokens/s and TTFT p50 per model and concurrency (medians over rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import bodies, build_model, pct  # noqa: E402
from load import run_load  # noqa: E402

MODELS = ("qwen2_5_vl", "qwen2_5_vl_ensemble")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", help="bench.py model name (tiny, bench, ...)")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=0, help="per model, level and round (default: max(8, 2 x c))")
    args = ap.parse_args(argv)
    from tritonvl.handlers.tools.launcher import ServerProcess

    with ServerProcess(build_model(args.model), log_path="/tmp/tritonvl-front-hop.log", ready_timeout=1200) as srv:
        url = {m: f"http://{srv.http_url}/v2/models/{m}/generate" for m in MODELS}
        for m in MODELS:  # warm-up
            asyncio.run(run_load(url[m], bodies("text", 2, 4, 10**6), 2, True))
        offset = 0
        print("| concurrency | model | output tok/s | TTFT p50 ms | rounds |\n|---|---|---|---|---|")
        for c in (int(x) for x in args.concurrency.split(",")):
            n = args.requests or max(8, 2 * c)
            tps: dict[str, list[float]] = {m: [] for m in MODELS}
            ttft: dict[str, list[float]] = {m: [] for m in MODELS}
            for r in range(args.rounds):
                for m in (MODELS if r % 2 == 0 else MODELS[::-1]):
                    records, wall = asyncio.run(run_load(url[m], bodies("text", n, args.max_tokens, offset), c, True))
                    offset += n
                    bad = [x.error for x in records if not x.ok]
                    if bad:
                        raise SystemExit(f"{m}: {len(bad)} failed: {bad[0]}")
                    tps[m].append(sum(x.tokens for x in records) / wall)
                    ttft[m].append(pct([x.ttft for x in records], 50) * 1000)
            for m in MODELS:
                print(f"| {c} | {m} | {statistics.median(tps[m]):.1f} | {statistics.median(ttft[m]):.1f} | "
                      f"{args.rounds} |")
            front, ens = MODELS
            print(f"| {c} | front / ensemble | {statistics.median(tps[front]) / statistics.median(tps[ens]):.3f} | "
                  f"{statistics.median(ttft[front]) - statistics.median(ttft[ens]):+.1f} ms | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
