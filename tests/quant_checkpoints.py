"""Tiny quantized checkpoints for the tests, made with compressed-tensors' own API (no hub, no data).

``make_compressed(src, dst, preset)``: the fp32 tiny model at ``src`` with compressed-tensors' preset
scheme (W4A16 pack-quantized, W8A8 int8 with dynamic per-token activations, FP8_DYNAMIC) applied to
the decoder's Linear layers, weight scales from each weight's own min/max (what llm-compressor's
data-free weight observers compute; activations are dynamic), compressed by compressed-tensors'
ModelCompressor and saved with its ``quantization_config``. The vision tower and lm_head are in the
ignore list unless ``quantize_tower``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

GROUP_SIZE = 32  # the test model's widths (48, 80, 96, 160) are multiples of 16/32, not of the default 128


def make_compressed(src, dst, preset: str, quantize_tower: bool = False) -> Path:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    from tritonvl.handlers.weights import model_class

    src, dst = Path(src), Path(dst)
    model = model_class(str(src), 2).from_pretrained(str(src), dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights.group_size:
        scheme.weights = scheme.weights.model_copy(update={"group_size": GROUP_SIZE})
    ignore = ["lm_head"] + ([] if quantize_tower else ["re:.*visual.*"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            w = module.weight
            if args.strategy == "group":
                rows = w.reshape(w.shape[0], -1, args.group_size)
                lo, hi = rows.amin(-1), rows.amax(-1)
            else:  # channel
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale, zero = calculate_qparams(lo, hi, args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized" if preset == "W4A16" else None)
    compressor.compress_model(model)
    model.save_pretrained(str(dst))
    compressor.update_config(str(dst))
    # compressed-tensors wrote the ignored modules by name as transformers saved them ("visual.blocks.0...");
    # transformers 5 names them "model.visual..." at load, so keep the pattern (as published checkpoints do)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["ignore"] = ignore
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():  # tokenizer, processor, chat template
        if not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    return dst


# ---- GPTQ and AWQ (gemm): a reference packer written from the formats' documentation -------------
# (no GPTQ/AWQ library installs beside the server's numpy<2 / protobuf<5: docs/QUANTIZATION.md). It
# quantizes each decoder linear weight round-to-nearest per group (min/max: data-free, no calibration),
# packs the codes as the format stores them and also writes the fake-quantized fp32 model: the weights
# scale * (code - zero) computed here from the codes before packing, the parity oracle.

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word bits 4k hold column AWQ_PACK_ORDER[k] of its eight


def _pack(codes, bits: int, dim: int, order=None):
    """Pack ``bits``-bit codes (int64, [rows, cols]) into int32 words along ``dim``: code k at bits k*bits."""
    import torch

    per = 32 // bits
    c = codes if dim == 1 else codes.t()
    c = c.reshape(c.shape[0], -1, per)
    if order is not None:
        c = c[:, :, list(order)]
    words = torch.zeros(c.shape[:2], dtype=torch.int64)
    for k in range(per):
        words |= c[:, :, k] << (bits * k)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
    return words if dim == 1 else words.t().contiguous()


def _quantize(w, bits: int, group: int, sym: bool, perm=None):
    """Round-to-nearest per group of ``group`` input columns of w [out, in]; ``perm``: act-order's input
    order (groups of consecutive permuted columns). Returns codes [out, in], scales and zeros
    [groups, out] (scales already fp16), g_idx [in]."""
    import torch

    out, n = w.shape
    order = torch.arange(n) if perm is None else perm
    g_idx = torch.empty(n, dtype=torch.int64)
    g_idx[order] = torch.arange(n) // group
    maxq = 2**bits - 1
    scales, zeros = [], []
    for g in range(n // group):
        cols = w[:, order[g * group:(g + 1) * group]]
        if sym:
            s = (cols.abs().amax(1) * 2 / maxq).clamp(min=1e-8)
            z = torch.full((out,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = ((hi - lo) / maxq).clamp(min=1e-8)
            z = torch.round(-lo / s.half().float()).clamp(0, maxq).to(torch.int64)
        scales.append(s.half())
        zeros.append(z)
    scales, zeros = torch.stack(scales), torch.stack(zeros)
    codes = torch.round(w / scales.float()[g_idx].t()) + zeros[g_idx].t()
    return codes.clamp(0, maxq).to(torch.int64), scales, zeros, g_idx


def make_packed(src, dst, method: str, *, bits: int = 4, group: int = GROUP_SIZE, sym: bool = False,
                desc_act: bool = False, v1: bool = True, quantize_tower: bool = False):
    """``dst``: the tiny model at ``src`` as a GPTQ (``method='gptq'``: v1 or v2 zeros, sym or asym,
    act-order when ``desc_act``) or AWQ gemm (``'awq'``, 4-bit asym) checkpoint, in the published
    layout (transformers 4.x names, fp16 scales and biases, ``modules_to_not_convert`` / unquantized
    tower and lm_head); returns (dst, the fake-quantized fp32 checkpoint beside it)."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    ref = dst.parent / f"{dst.name}-dequantized"
    state = load_file(str(src / "model.safetensors"))
    packed, plain = {}, dict(state)
    gen = torch.Generator().manual_seed(0)
    for key, w in state.items():
        linear = key.endswith("_proj.weight") and key.startswith("model.layers.")
        tower = (quantize_tower and key.startswith("visual.") and key.endswith(("qkv.weight", "proj.weight"))
                 and w.dim() == 2 and w.shape[0] % 8 == 0)
        if not (linear or tower) or w.shape[1] % group and not tower:
            continue
        name = key[: -len(".weight")]
        perm = torch.randperm(w.shape[1], generator=gen) if desc_act else None
        size = group if w.shape[1] % group == 0 else w.shape[1]  # the tower's widths: one group a row
        codes, scales, zeros, g_idx = _quantize(w.float(), bits, size, sym and method == "gptq", perm)
        deq = (codes - zeros[g_idx].t()).float() * scales.float()[g_idx].t()  # the oracle's weight [out, in]
        plain[key] = deq
        if method == "awq":
            packed[f"{name}.qweight"] = _pack(codes.t(), 4, 1, AWQ_PACK_ORDER)
            packed[f"{name}.qzeros"] = _pack(zeros, 4, 1, AWQ_PACK_ORDER)
        else:
            packed[f"{name}.qweight"] = _pack(codes.t(), bits, 0)
            stored = (zeros - 1) & (2**bits - 1) if v1 else zeros
            packed[f"{name}.qzeros"] = _pack(stored, bits, 1)
            packed[f"{name}.g_idx"] = g_idx.to(torch.int32)
        packed[f"{name}.scales"] = scales
        if f"{name}.bias" in state:
            packed[f"{name}.bias"] = state[f"{name}.bias"].half()
            plain[f"{name}.bias"] = state[f"{name}.bias"].half().float()
    done = {k.rsplit(".", 1)[0] for k in packed if k.endswith(".qweight")}
    for key, t in state.items():  # everything else as it was (fp32): embeddings, norms, the tower
        if key.rsplit(".", 1)[0] not in done:
            packed[key] = t
    if method == "awq":
        q = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True,
             "modules_to_not_convert": [] if quantize_tower else ["visual"]}
    else:
        q = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
             "checkpoint_format": "gptq" if v1 else "gptq_v2", "lm_head": False, "damp_percent": 0.01,
             "static_groups": False, "true_sequential": True}
    for directory, tensors in ((dst, packed), (ref, plain)):
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        for f in src.iterdir():
            if f.name != "model.safetensors" and f.is_file():
                shutil.copy(f, directory / f.name)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = q
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, ref
