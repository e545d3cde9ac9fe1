"""The compiled decode step (llm parameter compile=decode) against the eager engine, and the older
probe of torch.compile around attention.

Default (``--mode engine``): two in-process engines (OfflinePipeline) on the same model, one eager,
one with ``compile=decode`` and ``compile_buckets`` = the measured batch sizes (so each batch runs
its own bucket, no padding), each in its own process (two engines in one process run throttled:
docs/DEVICES.md), alternated level by level: N greedy requests of ``--max-tokens``
(ignore_eos) submitted at once, output tokens / wall seconds (prefill included), the compile time at
load, and whether both gave the same tokens.

    python benchmarks/compile_probe.py --model bench --batches 1,32
    python benchmarks/compile_probe.py --mode layers --model bench --batches 1,32   # the older probe

``--mode layers``: the model's own layer modules, eager against ``torch.compile`` for what surrounds
attention in a layer (pre: input_layernorm -> q/k/v -> mRoPE; post: o_proj + residual ->
post_attention_layernorm -> MLP + residual) over all layers, minimum of ``--reps``, and whether the
compiled outputs are bitwise equal to eager.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("engine", "layers"), default="engine")
    ap.add_argument("--model", default="bench")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=0, help="engine: runs per cell (default 2); layers: timings (30)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workloads", default="text,image")
    ap.add_argument("--buckets", default="", help="engine: compile_buckets (default: --batches); a batch "
                    "between two buckets runs padded")
    ap.add_argument("--worker", choices=("eager", "compiled"), help=argparse.SUPPRESS)  # engine mode's processes
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.mode == "engine":
        return engine(args)
    args.reps = args.reps or 30

    import torch
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf
    from bench import build_model

    from tritonvl.handlers.weights import load_full_model

    model_dir = build_model(args.model) if args.model in ("tiny", "bench") else args.model
    model = load_full_model(model_dir, "cpu", torch.float32)
    lm = model.model.language_model
    layers = list(lm.layers)
    cfg = lm.config
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def pre(h, pos):
        cos, sin = lm.rotary_emb(h, pos)
        out = []
        for layer in layers:
            x = layer.input_layernorm(h)
            q = layer.self_attn.q_proj(x).view(1, -1, heads, hd).transpose(1, 2)
            k = layer.self_attn.k_proj(x).view(1, -1, kv_heads, hd).transpose(1, 2)
            v = layer.self_attn.v_proj(x)
            q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
            out.append((q, k, v))
        return out

    def post(h, attn):
        for layer in layers:
            h = h + layer.self_attn.o_proj(attn)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return lm.norm(h)

    print(f"# {cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | model {args.model} "
          f"| load {load()}")
    cpre, cpost = torch.compile(pre, dynamic=False), torch.compile(post, dynamic=False)
    print("| batch | eager pre+post ms | compiled pre+post ms | compiled / eager | compile s | bitwise equal | load |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for b in [int(x) for x in args.batches.split(",")]:
            h = torch.randn(1, b, cfg.hidden_size)
            attn = torch.randn(1, b, cfg.hidden_size)
            pos = torch.randint(0, 500, (3, 1, b))
            t = time.perf_counter()
            cp, cq = cpre(h, pos), cpost(h, attn)
            compile_s = time.perf_counter() - t
            ep, eq = pre(h, pos), post(h, attn)
            equal = torch.equal(cq, eq) and all(torch.equal(a, b_) for x, y in zip(cp, ep) for a, b_ in zip(x, y))
            eager, comp = [], []
            for _ in range(args.reps):  # alternated
                t = time.perf_counter()
                pre(h, pos), post(h, attn)
                eager.append(time.perf_counter() - t)
                t = time.perf_counter()
                cpre(h, pos), cpost(h, attn)
                comp.append(time.perf_counter() - t)
            e, c = min(eager) * 1e3, min(comp) * 1e3
            print(f"| {b} | {e:.2f} | {c:.2f} | {c / e:.2f} | {compile_s:.0f} | {equal} | {load()} |", flush=True)


RESULT = "@@ "  # a worker's result lines start with this; anything else on its stdout is passed through


def _requests(args, workload: str, n: int) -> list:
    from bench import make_image

    from tritonvl.handlers.preprocess.preprocessor import RawRequest

    return [RawRequest(text_input=f"Request {i}: describe the history of lighthouses in detail.".encode(),
                       images=[make_image(i)] if workload == "image" else [],
                       sampling={"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True})
            for i in range(n)]


def worker(args) -> None:
    """One engine in this process (eager or compiled): its load on the first line, then one level per
    request line ("workload batch")."""
    import json
    import logging

    from bench import build_model

    from tritonvl.handlers.tools.offline import OfflinePipeline

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model = build_model(args.model) if args.model in ("tiny", "bench") else args.model
    batches = [int(x) for x in args.batches.split(",")]
    kw = {"max_num_seqs": max(batches), "kv_cache_bytes": 1 << 30}
    if args.worker == "compiled":
        kw.update(compile="decode", compile_buckets=tuple(int(x) for x in (args.buckets or args.batches).split(",")))
    t = time.perf_counter()
    with OfflinePipeline(model, **kw) as pipe:
        step = pipe.engine.runner.compiled
        info = {"load_s": time.perf_counter() - t}
        if step is not None:
            info.update(buckets=step.buckets, compile_s=step.compile_s)
        pipe.generate(_requests(args, "text", 2))  # warm-up
        print(RESULT + json.dumps(info), flush=True)
        for line in sys.stdin:
            workload, b = line.split()
            t = time.perf_counter()
            res = pipe.generate(_requests(args, workload, int(b)))
            wall = time.perf_counter() - t
            ids = [r.token_ids for r in res]
            out = {"tok_s": sum(map(len, ids)) / wall, "ids": ids}
            if step is not None:
                out.update(steps=step.steps, fallbacks=step.fallbacks)
            print(RESULT + json.dumps(out), flush=True)


def engine(args) -> None:
    """The two engines in two processes, alternated level by level: one engine per process, because two
    in one process keep two OpenMP teams and both then run throttled (docs/DEVICES.md)."""
    import json
    import statistics
    import subprocess

    import torch

    batches = [int(x) for x in args.batches.split(",")]
    reps = args.reps or 2
    print(f"# {cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | model {args.model} "
          f"| load {load()}", flush=True)
    base = [sys.executable, __file__, "--model", args.model, "--batches", args.batches, "--max-tokens",
            str(args.max_tokens), "--buckets", args.buckets or args.batches]
    procs = {name: subprocess.Popen(base + ["--worker", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True) for name in ("eager", "compiled")}

    def reply(name: str) -> dict:
        for line in procs[name].stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
            print(line, end="")
        raise RuntimeError(f"the {name} worker ended (exit {procs[name].wait()})")

    def ask(name: str, workload: str, b: int) -> dict:
        procs[name].stdin.write(f"{workload} {b}\n")
        procs[name].stdin.flush()
        return reply(name)

    try:
        reply("eager")
        comp = reply("compiled")
        print(f"# compiled buckets {comp['buckets']}: compile {comp['compile_s']:.0f} s (load with compile "
              f"{comp['load_s']:.0f} s) | load {load()}", flush=True)
        rows, last = [], {}
        for workload in args.workloads.split(","):
            for b in batches:
                tps = {"eager": [], "compiled": []}
                ids = {}
                loads = []
                for _ in range(reps):
                    for name in ("eager", "compiled"):  # alternated
                        got = ask(name, workload, b)
                        ids.setdefault(name, got["ids"])
                        tps[name].append(got["tok_s"])
                        if name == "compiled":
                            last = got
                    loads.append(load().split()[0])
                e, c = statistics.median(tps["eager"]), statistics.median(tps["compiled"])
                rows.append((workload, b, e, c, ids["eager"] == ids["compiled"], " / ".join(loads)))
                print(f"  {workload} b{b}: eager {e:.1f} compiled {c:.1f} tok/s", flush=True)
        print(f"# compiled steps {last.get('steps')}, eager fallbacks inside the buckets {last.get('fallbacks')}")
    finally:
        for p in procs.values():
            p.stdin.close()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    print("| workload | batch | eager tok/s | compiled tok/s | compiled / eager | same tokens | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for workload, b, e, c, same, lds in rows:
        print(f"| {workload} | {b} | {e:.1f} | {c:.1f} | {c / e:.2f} | {same} | {lds} |")

if __name__ == "__main__":
    main()
