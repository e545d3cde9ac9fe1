"""Where one engine step's time goes: decode at batch 1 and batch 32, and one prefill.

Runs the in-process engine (handlers/tools/offline.py OfflinePipeline) on a model (the ``bench``
preset by default), wraps the pieces of a step with perf_counter timers, and prints per step the
median milliseconds of each piece:

    step = schedule + pack + forward + lm_head + sampling + postprocess (+ engine loop rest)
    forward = attention meta + embed + rotary (cos/sin from mRoPE positions, and its application to q/k)
              + linears (q/k/v/o, gate/up/down) + attention (write K/V, SDPA) + attention meta
              + norms + "other" (activations, residual adds, reshapes, Python between ops)

    python benchmarks/profile_step.py                  # bench preset, batch 1 and 32, text + image
    python benchmarks/profile_step.py --model tiny --torch-profiler

Times are exclusive (a piece's time less the wrapped pieces inside it); medians are taken per
piece, so the sums are close to, not equal to, the step's median. The timers add about a microsecond per wrapped call (~90 calls a step on the bench preset); the
figures are medians over the steps of one run, so compare them with each other, not across runs
(``uptime`` is printed beside them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, load  # noqa: E402

PIECES = ["schedule", "pack", "meta", "embed", "rotary", "linears", "attention", "norms", "other(fwd)",
          "forward", "lm_head", "sampling", "postprocess", "loop rest", "step"]


CLOCK = time.perf_counter  # --cpu-time: time.thread_time (the engine thread's own CPU time)


class Timers:
    """Exclusive times: a wrapped call's time less that of the wrapped calls inside it (the fused
    greedy lm_head runs inside sampling; the pieces of the forward inside the forward)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self.stack: list[list[float]] = []

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            frame = [0.0]
            self.stack.append(frame)
            t = CLOCK()
            try:
                return fn(*a, **k)
            finally:
                elapsed = CLOCK() - t
                self.stack.pop()
                self.acc[name] += elapsed - frame[0]
                if self.stack:
                    self.stack[-1][0] += elapsed

        return timed

    def take(self) -> dict[str, float]:
        out, self.acc = dict(self.acc), defaultdict(float)
        return out


def instrument(pipe, timers: Timers, steps: list) -> None:
    """Wrap the engine's pieces; every step appends (kind, rows, {piece: seconds}) to ``steps``."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tritonvl.handlers.engine import model_runner as mr

    eng = pipe.engine
    runner = eng.runner
    eng.scheduler.schedule = timers.wrap("schedule", eng.scheduler.schedule)
    runner.pack = timers.wrap("pack", runner.pack)
    runner.forward = timers.wrap("other(fwd)", runner.forward)
    runner.timers = timers  # for the variants that swap the head (_mkl_head)
    head = runner.head  # the output layer (engine/output_head.py), called from sampling
    head.logits = timers.wrap("lm_head", head.logits)
    head.argmax = timers.wrap("lm_head", head.argmax)
    eng.sample = timers.wrap("sampling", eng.sample)
    eng.postprocess = timers.wrap("postprocess", eng.postprocess)
    mr.attn.build_meta = timers.wrap("meta", mr.attn.build_meta)
    hf.apply_rotary_pos_emb = timers.wrap("rotary", hf.apply_rotary_pos_emb)
    lm = runner.lm
    lm.rotary_emb.forward = timers.wrap("rotary", lm.rotary_emb.forward)
    lm.embed_tokens.forward = timers.wrap("embed", lm.embed_tokens.forward)
    lm.norm.forward = timers.wrap("norms", lm.norm.forward)
    for layer in lm.layers:
        for mod in (layer.input_layernorm, layer.post_attention_layernorm):
            mod.forward = timers.wrap("norms", mod.forward)
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            mod.forward = timers.wrap("linears", mod.forward)
    name = runner.lm.config._attn_implementation  # the engine's own attention function (attention/registry.py)
    ALL_ATTENTION_FUNCTIONS[name] = timers.wrap("attention", ALL_ATTENTION_FUNCTIONS[name])
    step = eng.step
    pack = runner.pack
    seen = {"rows": 0, "tokens": 0}

    def counting_pack(batch):  # the step's rows (sequences) and new tokens
        seen["rows"], seen["tokens"] = len(batch), sum(e.num_new_tokens for e in batch)
        return pack(batch)

    runner.pack = counting_pack

    def timed_step():
        seen["rows"] = seen["tokens"] = 0
        t = CLOCK()
        step()
        acc = timers.take()
        acc["step"] = CLOCK() - t
        if seen["rows"]:
            steps.append(("decode" if seen["tokens"] == seen["rows"] else "prefill", seen["rows"], acc))

    eng.step = timed_step


def summarize(steps: list, kind: str, rows: int | None) -> dict[str, float] | None:
    sel = [acc for k, r, acc in steps if k == kind and (rows is None or r == rows)]
    if not sel:
        return None
    out = {}
    for p in PIECES:
        if p in ("forward", "loop rest"):
            continue
        out[p] = statistics.median(acc.get(p, 0.0) for acc in sel) * 1e3
    out["forward"] = sum(out[p] for p in ("meta", "embed", "rotary", "linears", "attention", "norms", "other(fwd)"))
    out["loop rest"] = out["step"] - sum(out[p] for p in ("schedule", "pack", "forward", "lm_head", "sampling",
                                                             "postprocess"))
    out["n"] = len(sel)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", help="tiny | bench | a model directory")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workloads", default="text,image")
    ap.add_argument("--torch-profiler", action="store_true", help="also print torch.profiler's top ops of "
                    "the batch-32 decode steps")
    ap.add_argument("--ab", action="store_true", help="alternate the engine as it is with the engine "
                    "computing whole logits every step (before the fused greedy output layer) and with the "
                    "output layer as before engine/output_head.py (mkl-head), and without the int8 greedy screen "
                    "(no-screen)")
    ap.add_argument("--variants", default="", help="with --ab: which of full-logits,mkl-head,no-screen,now (default all)")
    ap.add_argument("--cpu-time", action="store_true", help="one torch thread, and every piece timed by the "
                    "engine thread's CPU time (time.thread_time): time taken by other processes on a shared "
                    "machine does not count (their cache and memory traffic still does)")
    ap.add_argument("--reps", type=int, default=1, help="runs of each workload (and variant)")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE", help="llm parameters")
    args = ap.parse_args()

    import torch
    from bench import build_model, make_image  # benchmarks/bench.py

    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    model = build_model(args.model) if args.model in ("tiny", "bench") else args.model
    from tritonvl.handlers.params import typed_strings

    kw = typed_strings("llm", dict(kv.split("=", 1) for kv in args.engine))  # typed as the server types them
    kw.setdefault("max_num_seqs", 64)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
        kw["num_threads"] = 1

    print(f"# {os.uname().nodename} | {cpu_model()} | torch {torch.__version__} threads "
          f"{torch.get_num_threads()} | model {args.model} | load {load()}")
    timers = Timers()
    steps: list = []
    with OfflinePipeline(model, **kw) as pipe:
        def requests(workload: str, n: int, offset: int):
            out = []
            for i in range(offset, offset + n):
                out.append(RawRequest(text_input=f"Request {i}: describe the history of lighthouses in detail.".encode(),
                                      images=[make_image(i)] if workload == "image" else [],
                                      sampling={"max_tokens": args.max_tokens, "temperature": 0.0,
                                                "ignore_eos": True}))
            return out

        pipe.generate(requests("text", 2, 10_000))  # warm-up
        instrument(pipe, timers, steps)
        variants = VARIANTS if args.ab else {"now": None}
        if args.ab and args.variants:
            variants = {k: VARIANTS[k] for k in args.variants.split(",")}
        results, tokens = [], {}
        for workload in args.workloads.split(","):
            for b in [int(x) for x in args.batches.split(",")]:
                for _rep in range(args.reps):
                    for name, patch in variants.items():  # alternated: the load drifts alike for each
                        steps.clear()
                        undo = patch(pipe) if patch else None
                        prof = None
                        if args.torch_profiler and b == max(int(x) for x in args.batches.split(",")):
                            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                            prof.__enter__()
                        t = time.perf_counter()
                        res = pipe.generate(requests(workload, b, 100 * b + (0 if workload == "text" else 5000)))
                        wall = time.perf_counter() - t
                        if prof is not None:
                            prof.__exit__(None, None, None)
                            print(f"\n## torch.profiler, {workload} batch {b} {name} (whole run)")
                            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
                        if undo:
                            undo()
                        ids = [r.token_ids for r in res]
                        tokens.setdefault((workload, b), ids)
                        same = tokens[(workload, b)] == ids
                        results.append((f"{workload} b{b} {name}", b, list(steps), sum(map(len, ids)) / wall,
                                        load(), same))
    print_table(results)


def _full_logits(pipe):
    """The engine as before the fused greedy output layer: whole logits for every step."""
    runner = pipe.engine.runner
    run = runner.run

    def full(batch):
        ids, logits = run(batch)
        return ids, (logits.full() if logits is not None else None)

    runner.run = full
    return lambda: setattr(runner, "run", run)


class _RowMajorHead:
    """The output layer as it was before engine/output_head.py: F.linear over the row-major
    [vocab, hidden] weight (MKL; W @ h.T for 2-16 rows), and for 2+ greedy rows the argmax over
    4096-row chunks of that weight."""

    def __init__(self, head) -> None:
        import torch
        parts = [head.blocks.transpose(1, 2).reshape(-1, head.blocks.shape[1])]
        if head.tail is not None:
            parts.append(head.tail.T)
        self.w = torch.cat(parts).contiguous()
        self.vocab = self.w.shape[0]

    def logits(self, h):
        import torch
        if 2 <= h.shape[0] <= 16:
            return torch.mm(self.w, h.T).T.float()
        return torch.nn.functional.linear(h, self.w).float()

    def argmax(self, h):
        import torch
        if h.shape[0] < 2:
            return self.logits(h).argmax(dim=-1).tolist()
        best_v = best_i = None
        for c0 in range(0, self.vocab, 4096):
            v, i = torch.mm(self.w[c0:c0 + 4096], h.T).max(dim=0)
            if best_v is None:
                best_v, best_i = v, i
            else:
                better = v > best_v
                best_v, best_i = torch.where(better, v, best_v), torch.where(better, i + c0, best_i)
        return best_i.tolist()


def _mkl_head(pipe):
    """The engine with the output layer as before (row-major weight, MKL): engine/output_head.py's A/B."""
    runner = pipe.engine.runner
    head = runner.head
    if not hasattr(runner, "_row_major_head"):
        old = _RowMajorHead(head)
        old.logits = runner.timers.wrap("lm_head", old.logits)
        old.argmax = runner.timers.wrap("lm_head", old.argmax)
        runner._row_major_head = old
    runner.head = runner._row_major_head
    return lambda: setattr(runner, "head", head)


def _no_screen(pipe):
    """The greedy output layer without the int8 screen (llm cpu_greedy_screen=false): the fp32 product."""
    head = pipe.engine.runner.head
    screen, head.screen = head.screen, None
    return lambda: setattr(head, "screen", screen)


VARIANTS = {"full-logits": _full_logits, "mkl-head": _mkl_head, "no-screen": _no_screen, "now": None}


def print_table(results) -> None:
    merged: dict[str, list] = {}
    for label, b, steps, tps, ld, same in results:
        m = merged.setdefault(label, [b, [], [], [], True])
        m[1].extend(steps)
        m[2].append(tps)
        m[3].append(ld)
        m[4] = m[4] and same
    cols = []
    for label, (b, steps, _tps, _lds, _same) in merged.items():
        dec = summarize(steps, "decode", b)
        if dec:
            cols.append((f"{label} decode", dec))
        pre = summarize(steps, "prefill", None)
        if pre and b == 1:
            cols.append((f"{label} prefill", pre))
    print("\n| ms per step (median) | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for p in PIECES + ["n"]:
        fmt = (lambda v: f"{v:.0f}") if p == "n" else (lambda v: f"{v:.2f}")
        print(f"| {p if p != 'n' else 'steps measured'} | " + " | ".join(fmt(d[p]) for _, d in cols) + " |")
    print()
    for label, (_b, _steps, tps, lds, same) in merged.items():
        print(f"{label}: {statistics.median(tps):.1f} output tok/s (median of {len(tps)} runs, prefill "
              f"included); same tokens as the first variant: {same}; load {' / '.join(lds)}")


if __name__ == "__main__":
    main()
