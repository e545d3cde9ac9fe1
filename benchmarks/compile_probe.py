"""Does torch.compile (inductor) speed up the decoder's non-attention work on this CPU?

The engine's decode step runs HF's Qwen2.5-VL decoder layers eagerly; the profile
(benchmarks/profile_step.py) puts about 6-9 ms of a bench-preset batch-1 step in rotary, norms and
the elementwise ops between the GEMMs. This probe takes the model's own layer modules and times,
alternated in one process, eager against ``torch.compile`` for what surrounds attention in a layer:

    pre:  input_layernorm -> q/k/v projections -> mRoPE (cos/sin from positions, applied to q and k)
    post: o_proj + residual -> post_attention_layernorm -> MLP + residual

over all layers, at decode batch sizes (each a static shape, as a padded bucket would be), and
checks the compiled outputs are bitwise equal to eager. Attention is left out (it would be the
custom op in the compiled step).

    python benchmarks/compile_probe.py --model bench --batches 1,8,32
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
    ap.add_argument("--model", default="bench")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
