"""fp32 against llm.quantization=int8_weight_only on the in-process engine, side by side in one run.

Each system runs in a child process of its own (so its resident memory is its own): the bench preset
(or --model) loaded by OfflinePipeline with ``quantization`` set, one warm-up, then greedy text
requests at each concurrency (all in flight together, ``ignore_eos``), repeated ``--reps`` times with
the systems alternated (fp32, int8, fp32, int8, ...) so that the load drifts alike for both.

    python benchmarks/quant_bench.py                       # bench preset, concurrency 1 and 32
    python benchmarks/quant_bench.py --levels 1,8,32 --max-tokens 64 --reps 3

Per system and level: generated tokens/s (every request's tokens / the wall time of the batch, its
~20-token prompts' prefill included; decode dominates at --max-tokens 64; the median over reps), and
per system: the resident set size after loading and malloc_trim (RSS, psutil), what importing
torchao adds to it (measured in the fp32 child, where it was not imported yet) and the bytes of the
decoder's linear layers and of the whole decoder with its embeddings (engine_info's labels). ``uptime``'s load average is printed beside the figures: the machine may be
shared, so compare the two columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, load  # noqa: E402

SYSTEMS = ["none", "int8_weight_only"]


def child(args) -> None:
    """One system: load, warm up, then read levels from stdin ("LEVEL" lines) and answer JSON lines."""
    import psutil
    import torch
    from bench import build_model  # benchmarks/bench.py

    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    model = build_model(args.model) if args.model in ("tiny", "bench") else args.model
    with OfflinePipeline(model, quantization=args.child, max_num_seqs=64) as pipe:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what loading freed (fp32 copies) back to the OS, in both
        rss = psutil.Process().memory_info().rss

        def run(n: int, offset: int) -> list:
            return pipe.generate([RawRequest(
                text_input=f"Request {i}: describe the history of lighthouses in detail.".encode(),
                sampling={"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True})
                for i in range(offset, offset + n)])

        run(2, 10_000)  # warm-up
        before = psutil.Process().memory_info().rss
        import torchao  # noqa: F401  (already imported by the int8 child: what its libraries add to RSS)
        libs = psutil.Process().memory_info().rss - before
        print(json.dumps({"ready": True, "rss": rss, "torchao_rss": libs, "threads": torch.get_num_threads(),
                          **pipe.engine.runner.weights}), flush=True)
        for line in sys.stdin:
            n = int(line)
            t = time.perf_counter()
            res = run(n, 100 * n)
            wall = time.perf_counter() - t
            assert not any(r.error for r in res), [r.error for r in res]
            print(json.dumps({"level": n, "decode_tps": sum(len(r.token_ids) for r in res) / wall,
                              "ids": [r.token_ids for r in res]}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", help="tiny, bench (a tiny_model preset) or a model directory")
    ap.add_argument("--levels", default="1,32", help="concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    import torch

    print(f"# {os.uname().nodename} | {cpu_model()} | torch {torch.__version__} | model {args.model} | "
          f"max_tokens {args.max_tokens} | load at start {load()}")
    procs, info = {}, {}
    for name in SYSTEMS:  # loaded one after the other, both kept until the end
        procs[name] = subprocess.Popen([sys.executable, __file__, "--child", name, "--model", args.model,
                                        "--max-tokens", str(args.max_tokens)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for line in procs[name].stdout:
            if line.startswith("{"):
                info[name] = json.loads(line)
                break
        else:
            raise SystemExit(f"{name}: the child ended before loading")
    levels = [int(x) for x in args.levels.split(",")]
    tps: dict = {(s, n): [] for s in SYSTEMS for n in levels}
    same: dict = {}
    try:
        for _ in range(args.reps):
            for n in levels:
                ids = {}
                for name in SYSTEMS:  # alternated
                    procs[name].stdin.write(f"{n}\n")
                    procs[name].stdin.flush()
                    out = json.loads(procs[name].stdout.readline())
                    tps[(name, n)].append(out["decode_tps"])
                    ids[name] = out["ids"]
                same[n] = sum(a == b for a, b in zip(ids["none"], ids["int8_weight_only"]))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=120)
    print(f"load at end {load()}\n")
    print("| | fp32 | int8_weight_only | ratio |\n|---|---:|---:|---:|")
    for n in levels:
        a, b = statistics.median(tps[("none", n)]), statistics.median(tps[("int8_weight_only", n)])
        print(f"| generated tokens/s, concurrency {n} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    a, b = info["none"], info["int8_weight_only"]
    print(f"| resident memory after load (RSS) | {a['rss'] / 2**20:.0f} MiB | {b['rss'] / 2**20:.0f} MiB | "
          f"{b['rss'] / a['rss']:.2f} |")
    print(f"| of which torchao's libraries | - | {a['torchao_rss'] / 2**20:.0f} MiB | |")
    print(f"| decoder linear layers | {a['decoder_linear_bytes'] / 2**20:.1f} MiB | "
          f"{b['decoder_linear_bytes'] / 2**20:.1f} MiB | {b['decoder_linear_bytes'] / a['decoder_linear_bytes']:.2f} |")
    print(f"| decoder with embeddings | {a['decoder_weight_bytes'] / 2**20:.1f} MiB | "
          f"{b['decoder_weight_bytes'] / 2**20:.1f} MiB | {b['decoder_weight_bytes'] / a['decoder_weight_bytes']:.2f} |")
    print("\nsame greedy tokens as fp32 (last rep): " + ", ".join(f"c{n}: {same[n]}/{n}" for n in levels)
          + f" | torch threads per child {a['threads']} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
