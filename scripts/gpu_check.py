"""Engine check on a device, in one process (no Triton): parity with generate() and decode speed
against the memory-bandwidth bound.

    python scripts/gpu_check.py --device cuda:0 --sizes 3b            # random model, Qwen2.5-VL-3B sizes
    python scripts/gpu_check.py --device cuda:0 --sizes 3b --layers 12  # same widths, fewer layers
    python scripts/gpu_check.py --device cpu --model DIR --quick        # smoke run (CI does this)

1. Parity in float32: requests of text and of images of different sizes, all in flight in the
   engine at once, each token-identical to transformers' generate() on the same device (fails the
   run otherwise).
2. Agreement in bf16 (GPU/NPU): the same requests; the number of leading tokens that equal
   generate()'s in bf16 is reported (two different kernels in bf16 may part ways on a random model
   whose top logits are nearly tied; this is a report, not a pass/fail).
3. Decode speed in bf16 at several batch sizes: tokens/s from each sequence's inter-token time,
   against the bound: weight bytes read per step (decoder + lm_head) plus KV bytes, over the device
   bandwidth measured by a copy.

Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def build(args) -> Path:
    from tritonvl.handlers.tiny_model import PRESETS, build_tiny_model

    if args.model:
        return Path(args.model)
    sizes = json.loads(json.dumps(PRESETS[args.sizes]))
    if args.layers:
        sizes["text"]["num_hidden_layers"] = args.layers
    path = Path(args.work) / f"{args.sizes}-{sizes['text']['num_hidden_layers']}l"
    if not (path / "config.json").is_file():
        if not args.device.startswith("cpu"):
            sizes["init_device"] = args.device
        t0 = time.time()
        build_tiny_model(path, sizes)
        print(f"built {path} in {time.time() - t0:.0f} s", flush=True)
    return path


def requests(quick: bool):
    from tests.helpers import make_image
    from tritonvl.handlers.preprocess.preprocessor import RawRequest

    img_a, img_b = make_image(224, 168, 1), make_image(120, 260, 2)
    specs = [("Tell me a story about a fox.", [], 24), ("What is in the picture?", [img_a], 16),
             ("Compare the two pictures.", [img_a, img_b], 20), ("Count to twenty.", [], 12),
             ("Describe the colours.", [img_b], 16)]
    if quick:
        specs = specs[:3]
    out = []
    for text, images, n in specs:
        out.append((text, images, n, RawRequest(text_input=text.encode(), images=list(images),
                                                sampling={"max_tokens": n, "temperature": 0.0})))
    return out


def parity(model_dir: Path, device: str, dtype: str, engine_kwargs: dict, quick: bool) -> list[dict]:
    import torch

    from tests.helpers import Reference
    from tritonvl.handlers.tools.offline import OfflinePipeline

    reqs = requests(quick)
    pipe = OfflinePipeline(str(model_dir), device=device, dtype=dtype, **engine_kwargs)
    backend = pipe.engine.runner.backend.name
    try:
        got = pipe.generate([r for *_, r in reqs])
    finally:
        pipe.close()
        del pipe
    ref = Reference(str(model_dir), device=device, dtype=getattr(torch, dtype))
    rows = []
    for (text, images, n, _), res in zip(reqs, got):
        want = ref.generate(text, images, max_tokens=n)
        same = 0
        while same < min(len(want), len(res.token_ids)) and want[same] == res.token_ids[same]:
            same += 1
        rows.append({"dtype": dtype, "backend": backend, "prompt": text, "images": len(images),
                     "tokens": len(want), "equal": res.token_ids == want, "leading_equal": same,
                     "error": res.error})
    del ref
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def bandwidth(device: str) -> float:
    """Bytes per second a device-to-device copy moves (read + written)."""
    import torch

    n = (1 << 28) if not device.startswith("cpu") else (1 << 25)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        b.copy_(a)
    sync()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    sync()
    return 2 * n * reps / (time.perf_counter() - t0)


def decode_speed(model_dir: Path, device: str, dtype: str, engine_kwargs: dict, batches: list[int],
                 tokens: int) -> list[dict]:
    import torch

    from tritonvl.handlers.modelinfo import load_model_info
    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    info = load_model_info(model_dir)
    pipe = OfflinePipeline(str(model_dir), device=device, dtype=dtype, **engine_kwargs)
    runner = pipe.engine.runner
    elt = torch.empty((), dtype=runner.dtype).element_size()
    weight_bytes = sum(p.numel() for p in runner.lm.layers.parameters()) * elt
    weight_bytes += runner.head.weight_bytes + sum(p.numel() for p in runner.lm.norm.parameters()) * elt
    kv_per_token = 2 * info.num_layers * info.num_kv_heads * info.head_dim * elt
    bw = bandwidth(device)
    rows = []
    try:
        pipe.generate([RawRequest(text_input=b"warm up", sampling={"max_tokens": 4})])
        for b in batches:
            reqs = [RawRequest(text_input=f"Write a long list of items, number {i}.".encode(), stream=True,
                               sampling={"max_tokens": tokens, "ignore_eos": True, "temperature": 0.0})
                    for i in range(b)]
            res = pipe.generate(reqs)
            errors = [r.error for r in res if r.error]
            if errors:
                raise RuntimeError(errors[0])
            itl = statistics.median((r.finished - r.first_token) / max(len(r.token_ids) - 1, 1) for r in res)
            ctx = statistics.mean(r.num_input_tokens for r in res) + tokens / 2
            step_bytes = weight_bytes + b * ctx * kv_per_token
            bound = b * bw / step_bytes
            rows.append({"batch": b, "itl_ms": itl * 1e3, "tokens_per_s": b / itl, "bound_tokens_per_s": bound,
                         "fraction_of_bound": (b / itl) / bound, "backend": runner.backend.name,
                         "weight_bytes": weight_bytes, "bandwidth_gb_s": bw / 1e9})
    finally:
        pipe.close()
    return rows


def runnable(backend: str, device: str) -> bool:
    """Whether the named attention backend can run on ``device`` in bf16 (else say why and skip it)."""
    import torch

    from tritonvl.handlers.engine import attention

    if backend == "auto":
        return True
    dtype = torch.float32 if device.startswith("cpu") else torch.bfloat16
    reason = attention.unavailable(attention.BACKENDS[backend], device, dtype, 128)
    if reason:
        print(f"skipping {backend}: {reason}")
    return reason is None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--sizes", default="3b", choices=["3b", "bench"])
    ap.add_argument("--layers", type=int, default=0, help="override the number of decoder layers")
    ap.add_argument("--model", help="an existing model directory instead of building one")
    ap.add_argument("--work", default="/tmp/tritonvl-gpu-check")
    ap.add_argument("--attention", default="auto",
                    help="backend for parity; decode speed runs each of a comma list, e.g. sdpa,triton,flash_attn")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="3 parity requests, batches 1,4, 8 tokens")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    model_dir = build(args)
    backends = [b for b in args.attention.split(",") if runnable(b, args.device)]
    if not backends:
        print("none of the backends can run here:", args.attention)
        return 1
    kw = {"attention_backend": backends[0], "max_num_seqs": 64}
    on_cpu = args.device.startswith("cpu")
    if on_cpu:
        kw["kv_cache_bytes"] = 1 << 28
    report = {"device": args.device, "model": str(model_dir)}
    report["parity_fp32"] = []
    for backend in backends:
        report["parity_fp32"] += parity(model_dir, args.device, "float32", {**kw, "attention_backend": backend}, args.quick)
    if not on_cpu:
        report["agreement_bf16"] = parity(model_dir, args.device, "bfloat16", kw, args.quick)
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    report["decode"] = []
    for backend in backends:
        report["decode"] += decode_speed(model_dir, args.device, "float32" if on_cpu else "bfloat16",
                                         {**kw, "attention_backend": backend}, batches, 8 if args.quick else args.tokens)

    for name in ("parity_fp32", "agreement_bf16"):
        for r in report.get(name, []):
            print(f"{name:15s} {r['backend']:10s} images={r['images']} equal={r['equal']!s:5s} "
                  f"leading_equal={r['leading_equal']}/{r['tokens']} {r['error']}")
    print("| backend | batch | ms/token | tokens/s | bound tokens/s | of bound |")
    print("|---|---|---|---|---|---|")
    for r in report["decode"]:
        print(f"| {r['backend']} | {r['batch']} | {r['itl_ms']:.2f} | {r['tokens_per_s']:.0f} "
              f"| {r['bound_tokens_per_s']:.0f} | {r['fraction_of_bound']:.0%} |")
    d = report["decode"][0]
    print(f"weights read per step {d['weight_bytes'] / 1e9:.2f} GB, "
          f"copy bandwidth {d['bandwidth_gb_s']:.0f} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    ok = all(r["equal"] and not r["error"] for r in report["parity_fp32"])
    print("fp32 parity:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
