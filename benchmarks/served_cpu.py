"""Where a served token's CPU goes: closed-loop streaming load on one tritonserver (the shipped model
repository, the bench preset), CPU seconds per 1000 output tokens for each process (tritonserver, each
model's Python stub, this load generator), from /proc/<pid>/stat before and after each round.

    python benchmarks/served_cpu.py                          # text, 32 and 8 streams, 3 rounds each
    python benchmarks/served_cpu.py --concurrency 32 --set stream_interval=4
    python benchmarks/served_cpu.py --model qwen2_5_vl_ensemble  # the ensemble: no BLS front hop

Linux only (reads /proc). The server is stopped at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import Triton, bodies, build_model  # noqa: E402
from load import run_load  # noqa: E402
from machine import cpu_model, load  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_by_process(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of tritonserver, of each model's stub (by model name) and of this process."""
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        name = None
        if int(pid) == server_pid:
            name = "tritonserver"
        elif cmd and cmd[0].endswith(b"triton_python_backend_stub"):
            script = next((c.decode() for c in cmd if c.endswith(b"/model.py")), "")
            name = "stub " + (script.split("/")[-3] if script else "?")
        if name:
            out[name] = out.get(name, 0.0) + (int(stat[11]) + int(stat[12])) / TICK
    t = os.times()
    out["load generator"] = t.user + t.system
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="32,8")
    ap.add_argument("--workload", choices=["text", "image"], default="text")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="qwen2_5_vl", help="the public model to load (or qwen2_5_vl_ensemble)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="llm_set",
                    help="llm parameters")
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.llm_set)
    server = Triton(build_model("bench"), "engine", {"max_num_seqs": 64, **extra},
                    log_path="/tmp/tritonvl-served-cpu.log")
    url = server.url.replace("/models/qwen2_5_vl/", f"/models/{args.model}/")
    print(f"# {cpu_model()} | {args.workload}, {args.max_tokens} tokens, model {args.model} | llm {extra} | "
          f"load {load()}", flush=True)
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            asyncio.run(run_load(url, bodies(args.workload, 2, args.max_tokens, 99_000), 2, True))  # warm-up
            for r in range(args.rounds):
                before = cpu_by_process(server.pid)
                records, wall = asyncio.run(run_load(url, bodies(args.workload, c, args.max_tokens, 1000 * c + 7 * r),
                                                     c, True))
                after = cpu_by_process(server.pid)
                tokens = sum(x.tokens for x in records if x.ok)
                failed = sum(not x.ok for x in records)
                per = {k: (after[k] - before.get(k, 0.0)) * 1000 / max(tokens, 1) for k in after}
                total = sum(per.values())
                print(f"{args.workload} {c} streams, round {r}: {tokens / wall:.1f} tok/s"
                      + (f", {failed} failed" if failed else "") + f", load {load()}; CPU s per 1000 tokens: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items()) if v >= 0.005)
                      + f"; all {total:.2f}", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
