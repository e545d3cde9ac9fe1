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
