#!/usr/bin/env python3
"""What fits on one device: Qwen VL weights + KV cache per token, from each model's config.json.

Each Triton instance of `vision_encoder` + `llm` holds the whole model on ONE device unless
`llm.tensor_parallel_size` splits the decoder over several (the last table, `--tp`): a model fits a
device only if its weights, a working reserve and a useful KV cache do. The shapes below are the published config.json values of the Instruct checkpoints.

    python scripts/sizing.py                          # the table (bf16)
    python scripts/sizing.py --config DIR/config.json --device-gib 80   # your own model / device
    python scripts/sizing.py --config DIR/config.json --weight-bits 4    # its decoder in 4-bit weights
    python scripts/sizing.py --config DIR/config.json --tp 4             # per device with llm.tensor_parallel_size 4
    python scripts/sizing.py --write docs/DEPLOY.md   # regenerate the table in the doc
    python scripts/sizing.py --check docs/DEPLOY.md   # exit 1 if the doc's table is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
BEGIN, END = "<!-- sizing:begin (scripts/sizing.py --write docs/DEPLOY.md) -->", "<!-- sizing:end -->"


@dataclass(frozen=True)
class Shape:
    """The config.json values that decide memory (text decoder + vision tower)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    vision_out: int  # vision_config.out_hidden_size (= the decoder's hidden size)
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_intermediate: int = 3420
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2
    in_chans: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def text_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q, k, v with bias; o without
        layer = attn + 3 * h * self.intermediate + 2 * h  # gated MLP, two RMSNorms
        head = 0 if self.tie_embeddings else self.vocab * h
        return self.vocab * h + self.layers * layer + h + head

    def vision_params(self) -> int:
        v, vi = self.vision_hidden, self.vision_intermediate
        patch_embed = self.in_chans * self.temporal_patch * self.patch**2 * v  # Conv3d, no bias
        block = 2 * v + (v * 3 * v + 3 * v) + (v * v + v) + 2 * (v * vi + vi) + (vi * v + v)
        m = v * self.merge**2
        merger = v + (m * m + m) + (m * self.vision_out + self.vision_out)
        return patch_embed + self.vision_depth * block + merger

    def params(self) -> int:
        return self.text_params() + self.vision_params()

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every linear weight of the decoder's layers: what a quantized checkpoint (AWQ,
        GPTQ, compressed-tensors) or llm.quantization stores in fewer bits; lm_head, embeddings, norms,
        biases and the vision tower stay 16-bit."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * self.layers

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes  # K and V, every layer

    def layer_params(self) -> int:
        """All decoder layers' parameters (what tensor parallelism splits)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return self.layers * ((h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h)


# Published config.json values (Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct). The vision tower is the
# same in all four (depth 32, hidden 1280, intermediate 3420, 16 heads); only its output width differs.
MODELS = [
    Shape("Qwen2.5-VL-3B", 2048, 11008, 36, 16, 2, 151936, True, 2048),
    Shape("Qwen2.5-VL-7B", 3584, 18944, 28, 28, 4, 152064, False, 3584),
    Shape("Qwen2.5-VL-32B", 5120, 27648, 64, 40, 8, 152064, False, 5120),
    Shape("Qwen2.5-VL-72B", 8192, 29568, 80, 64, 8, 152064, False, 8192),
]

# Memory as the driver reports it (approximate), not the marketing figure.
DEVICES = [
    ("24 GB GPU (L4, A10)", 22.5),
    ("40 GB GPU (A100 40GB)", 40.0),
    ("80 GB GPU (A100/H100 80GB)", 79.6),
    ("141 GB GPU (H200)", 139.8),
    ("64 GB Ascend 910B", 64.0),
]

# Per device, not counted in weights or KV: two CUDA/CANN contexts (vision_encoder and llm are
# separate stub processes), the allocator's slack, prefill activations at max_num_batched_tokens
# 2048 and the vision tower's activations on a large image. An estimate, not a measurement.
RESERVE_GIB = 4.0
CONTEXT = 8192  # tokens per sequence used for "sequences in flight"


@dataclass(frozen=True)
class Counted:
    """Any family's config.json (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL MoE): parameters counted on
    transformers' own model built on the meta device (exact, experts included, no weights read), KV
    from the text config (its explicit head_dim where it has one, as Qwen3's)."""

    name: str
    total: int
    layers: int
    kv_heads: int
    head_dim: int
    linear: tuple = ()  # (out, in) of the decoder layers' linear weights (experts included)
    layers_total: int = 0  # parameters of the decoder layers (what tensor parallelism splits)
    heads: int = 0

    def params(self) -> int:
        return self.total

    def linear_shapes(self) -> list[tuple[int, int]]:
        return list(self.linear)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def layer_params(self) -> int:
        return self.layers_total


def count_config(path: str) -> Counted:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(Path(path).parent))
    model_class = transformers.AutoModelForImageTextToText._model_mapping[type(config)]
    with torch.device("meta"):
        model = model_class._from_config(config)
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layers = model.model.language_model.layers
    linear = []
    for name, p in layers.named_parameters():  # 2-D weights of the layers (Linear, fused MoE experts)
        if p.dim() >= 2 and not name.endswith(("norm.weight", "gate.weight")):
            linear += [tuple(p.shape[-2:])] * (p.shape[0] if p.dim() == 3 else 1)
    return Counted(Path(path).parent.name or "model", sum(p.numel() for p in model.parameters()),
                   text.num_hidden_layers, text.num_key_value_heads, head_dim, tuple(linear),
                   sum(p.numel() for p in layers.parameters()), text.num_attention_heads)


# Quantized decoders (docs/QUANTIZATION.md): bits per weight of the decoder layers' linear layers.
# 4-bit: AWQ / GPTQ / compressed-tensors W4A16, a 16-bit scale and a 4-bit zero point per group of 128
# inputs; 8-bit: int8 (W8A8, llm.quantization=int8_weight_only) or FP8, one 16-bit scale per output row.
GROUP = 128
WEIGHT_FORMATS = {16: "bf16", 8: "8-bit (int8 W8A8 / FP8 / int8_weight_only)", 4: "4-bit (AWQ / GPTQ / W4A16, g128)"}


def weight_bytes(shape, nbytes: int, bits: int = 16) -> int:
    """Bytes of the weights with the decoder's linear layers in ``bits`` (16: everything in ``nbytes``)."""
    total = shape.params() * nbytes
    if bits >= 16:
        return total
    for out, inp in shape.linear_shapes():
        total -= out * inp * nbytes
        if bits == 8:
            total += out * inp + out * nbytes
        else:
            groups = out * -(-inp // GROUP)
            total += out * inp * bits // 8 + groups * nbytes + groups * bits // 8
    return total


def shape_from_config(path: str) -> Shape:
    cfg = json.loads(Path(path).read_text())
    text = cfg.get("text_config", cfg)  # transformers 5 nests the decoder; 4.x is flat
    vis = cfg["vision_config"]
    return Shape(Path(path).parent.name or "model", text["hidden_size"], text["intermediate_size"],
                 text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"],
                 text["vocab_size"], bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                 vis["out_hidden_size"], vis["depth"], vis["hidden_size"], vis["intermediate_size"],
                 vis.get("patch_size", 14), vis.get("temporal_patch_size", 2), vis.get("spatial_merge_size", 2),
                 vis.get("in_chans", vis.get("in_channels", 3)))


def _room(weights: float, per_token: float, device_gib: float, reserve_gib: float, context: int):
    """(KV bytes left on the device, KV tokens they hold, verdict) for ``weights`` bytes on it."""
    kv_room = device_gib * GIB - weights - reserve_gib * GIB
    tokens = max(int(kv_room // per_token), 0)
    if weights > device_gib * GIB:
        verdict = "no: weights exceed the device"
    elif kv_room <= 0:
        verdict = "no: weights + reserve exceed the device"
    elif tokens < context:
        verdict = f"no: KV for less than one {context // 1024}k sequence"
    else:
        verdict = "yes"
    return kv_room, tokens, verdict


def fit(shape: Shape, device_gib: float, dtype: str = "bfloat16", reserve_gib: float = RESERVE_GIB,
        context: int = CONTEXT, bits: int = 16) -> dict:
    """Weights, KV room and a verdict for one instance (vision_encoder + llm) on one device; ``bits``:
    the decoder's linear weights quantized (the KV cache stays in ``dtype``)."""
    nbytes = DTYPE_BYTES[dtype]
    weights = weight_bytes(shape, nbytes, bits)
    per_token = shape.kv_bytes_per_token(nbytes)
    kv_room, tokens, verdict = _room(weights, per_token, device_gib, reserve_gib, context)
    return {"weights_gib": weights / GIB, "kv_kib_per_token": per_token / 1024, "kv_gib": max(kv_room, 0) / GIB,
            "kv_tokens": tokens, "sequences": tokens // context, "verdict": verdict}


# Tensor parallelism (llm.tensor_parallel_size, docs/DEVICES.md): the decoder layers split over N
# devices (q/k/v, gate/up by output rows, o/down by input columns; KV heads split too), everything
# else whole on rank 0's device: vision tower (its vision_encoder instance shares that device, the
# worst case), embeddings, lm_head, final norm. The same reserve on every device.
TP_SIZES = (1, 2, 4, 8)


def fit_tp(shape, device_gib: float, tp: int, dtype: str = "bfloat16", reserve_gib: float = RESERVE_GIB,
           context: int = CONTEXT, bits: int = 16) -> dict:
    """fit() for rank 0's device (the fullest) of an instance sharded over ``tp`` devices: its weights,
    its KV room; ``sequences`` counts whole sequences (every rank holds 1/tp of each token's KV)."""
    nbytes = DTYPE_BYTES[dtype]
    total = weight_bytes(shape, nbytes, bits)
    whole = (shape.params() - shape.layer_params()) * nbytes  # not split: vision, embeddings, lm_head
    weights = whole + (total - whole) / tp
    per_token = shape.kv_bytes_per_token(nbytes) / tp
    kv_room, tokens, verdict = _room(weights, per_token, device_gib, reserve_gib, context)
    return {"tensor_parallel_size": tp, "weights_gib_per_device": weights / GIB,
            "kv_kib_per_token_per_device": per_token / 1024, "kv_gib": max(kv_room, 0) / GIB,
            "kv_tokens": tokens, "sequences": tokens // context, "verdict": verdict}


def tp_table(dtype: str = "bfloat16", reserve_gib: float = RESERVE_GIB, context: int = CONTEXT) -> str:
    """The smallest tensor_parallel_size (dividing heads and KV heads) at which each model fits each
    device, per decoder weight format."""
    names = [d for d, _ in DEVICES]
    lines = ["", f"Devices per llm instance (`llm.tensor_parallel_size`): the smallest size that fits, of "
             f"{', '.join(map(str, TP_SIZES))} (it must divide the heads and KV heads), and the {context // 1024}k "
             f"sequences the KV cache then holds. Per device: the decoder layers / N, and on rank 0's device the "
             f"vision tower, embeddings and lm_head whole. Quantized rows are arithmetic only: "
             f"tensor_parallel_size > 1 with llm.quantization is refused today (docs/DEVICES.md).", "",
             "| model | decoder weights | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for shape in MODELS:
        for bits in (16, 8, 4):
            cells = []
            for _, gib in DEVICES:
                sizes = [n for n in TP_SIZES if shape.heads % n == 0 and shape.kv_heads % n == 0]
                found = next(((n, f) for n in sizes
                              if (f := fit_tp(shape, gib, n, dtype, reserve_gib, context, bits))["verdict"] == "yes"),
                             None)
                cells.append(f"{found[0]} ({found[1]['sequences']} seq)" if found else "no")
            label = "bf16" if bits == 16 and dtype == "bfloat16" else dtype if bits == 16 else f"{bits}-bit"
            lines.append(f"| {shape.name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(dtype: str = "bfloat16", reserve_gib: float = RESERVE_GIB, context: int = CONTEXT) -> str:
    lines = [f"dtype {dtype}; reserve {reserve_gib:g} GiB per device; sequences of {context} tokens.", "",
             "| model | params | weights GiB | KV KiB/token | device | KV GiB | KV tokens | sequences | "
             "fits |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for shape in MODELS:
        for device, gib in DEVICES:
            f = fit(shape, gib, dtype, reserve_gib, context)
            lines.append(f"| {shape.name} | {shape.params() / 1e9:.2f} B | {f['weights_gib']:.1f} | "
                         f"{f['kv_kib_per_token']:.0f} | {device} | {f['kv_gib']:.1f} | {f['kv_tokens']:,} | "
                         f"{f['sequences']} | {f['verdict']} |")
    lines += ["", f"Quantized decoders: the decoder layers' linear weights in 8 or 4 bits, everything else (vision "
              f"tower, embeddings, lm_head, norms, biases) and the KV cache in {dtype}.", "",
              "| model | decoder weights | weights GiB | device | KV GiB | KV tokens | sequences | fits |",
              "|---|---|---:|---|---:|---:|---:|---|"]
    for shape in MODELS:
        for bits in (8, 4):
            for device, gib in DEVICES:
                f = fit(shape, gib, dtype, reserve_gib, context, bits)
                lines.append(f"| {shape.name} | {WEIGHT_FORMATS[bits]} | {f['weights_gib']:.1f} | {device} | "
                             f"{f['kv_gib']:.1f} | {f['kv_tokens']:,} | {f['sequences']} | {f['verdict']} |")
    return "\n".join(lines) + "\n" + tp_table(dtype, reserve_gib, context)


def splice(doc: str, block: str) -> str:
    head, sep, rest = doc.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"markers {BEGIN!r} ... {END!r} not found")
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--reserve-gib", type=float, default=RESERVE_GIB)
    ap.add_argument("--context", type=int, default=CONTEXT)
    ap.add_argument("--config", help="a model's config.json (any served family): size it instead of the published four")
    ap.add_argument("--device-gib", type=float, help="with --config: the device's memory in GiB")
    ap.add_argument("--weight-bits", type=int, default=16, choices=(16, 8, 4),
                    help="with --config: the decoder's linear weights in 8 or 4 bits (a quantized checkpoint)")
    ap.add_argument("--tp", type=int, default=1,
                    help="with --config: llm.tensor_parallel_size (the fullest device of the instance)")
    ap.add_argument("--write", metavar="DOC", help="replace the table between the sizing markers in DOC")
    ap.add_argument("--check", metavar="DOC", help="exit 1 if DOC's table differs from this script's")
    args = ap.parse_args(argv)
    if args.config:
        shape = count_config(args.config)
        out = {"params": shape.params(), **fit(shape, args.device_gib or 80.0, args.dtype, args.reserve_gib,
                                               args.context, args.weight_bits)}
        if args.tp > 1:
            if shape.heads % args.tp or shape.kv_heads % args.tp:
                raise SystemExit(f"--tp {args.tp} does not divide num_attention_heads {shape.heads} and "
                                 f"num_key_value_heads {shape.kv_heads}")
            out = {"params": shape.params(), **fit_tp(shape, args.device_gib or 80.0, args.tp, args.dtype,
                                                      args.reserve_gib, args.context, args.weight_bits)}
        print(json.dumps(out, indent=1))
        return 0
    block = table(args.dtype, args.reserve_gib, args.context)
    if args.write or args.check:
        path = Path(args.write or args.check)
        doc = path.read_text()
        new = splice(doc, block)
        if args.check:
            if new != doc:
                print(f"{path}: sizing table is stale; run: python scripts/sizing.py --write {path}", file=sys.stderr)
                return 1
            return 0
        path.write_text(new)
        return 0
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
