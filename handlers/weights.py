"""Load parts of a Qwen VL checkpoint (the vision tower, or the whole model for the decoder)."""

from __future__ import annotations

import json
from pathlib import Path

# transformers 4.x checkpoints (the published Qwen2.5-VL ones) name the tower `visual.*`;
# transformers 5 saves it as `model.visual.*`.
VISUAL_PREFIXES = ("model.visual.", "visual.")

# family (config.json model_type) -> (module, vision tower class, whole-model class) in transformers
CLASSES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionModel", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeVisionModel", "Qwen3VLMoeForConditionalGeneration"),
}


def model_class(model_dir: str, part: int):
    """transformers' class for ``model_dir``'s family: part 1 the vision tower, 2 the whole model."""
    import importlib

    from tritonvl.handlers.modelinfo import load_model_info

    module, *names = CLASSES[load_model_info(model_dir).family]
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), names[part - 1])


def safetensor_files(model_dir: str) -> list[Path]:
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def load_visual(model_dir: str, device: str, dtype):
    """Only the vision tower, with only its own weights read from disk."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from tritonvl.handlers import quant

    config = AutoConfig.from_pretrained(model_dir)
    vision_config = config.vision_config
    vision_config._attn_implementation = "sdpa"
    visual = model_class(model_dir, 1)._from_config(vision_config, dtype=dtype)
    state = {}
    for path in safetensor_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                prefix = next((p for p in VISUAL_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix):]] = f.get_tensor(key)
    quant.check_tower_keys(model_dir, state)
    missing, unexpected = visual.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"vision weights in {model_dir} do not fit: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    # Parameters are already ``dtype`` (_from_config); a cast of the whole module would also turn
    # the rotary inv_freq buffers (kept float32 by transformers' own loader) into ``dtype``, which in
    # bfloat16 changes every image's embeddings against transformers'.
    visual = visual.to(device=device)
    return visual.eval()


def load_full_model(model_dir: str, device: str, dtype, quantization: str = "none", backend: str = "engine"):
    """The whole model (transformers' own loader: handles every checkpoint layout, and a quantized
    checkpoint through its method's library); ``quantization`` (llm.quantization): quantize the
    decoder's linear layers after loading (handlers/quant.py). ``backend`` (llm.backend) is checked
    with it: the same ``check_serving`` that `tritonvl serve` runs before tritonserver starts."""
    from tritonvl.handlers import quant

    q = quant.check_serving(model_dir, device, quantization, backend)
    if q is not None and q["quant_method"] in ("gptq", "awq"):  # int32-packed: read by tritonvl itself
        from tritonvl.handlers import packed_quant

        model, per_layer = packed_quant.load_model(model_dir, model_class(model_dir, 2), dtype, q)
    else:
        model = model_class(model_dir, 2).from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        # compressed-tensors: the decoder's linear layers keep their compressed tensors and dequantize
        # their weight per forward (the memory saving); lm_head and the tower as the checkpoint stores them
        per_layer = quant.prepare_loaded(model)
    # quantized layer by layer on its way to the device (torchao moves each linear layer there first):
    # the 16-bit decoder never has to fit the device whole
    quant.quantize_decoder(model, quantization, device)
    model = model.to(device).eval()
    held = quant.describe(model, quantization)
    quant.log(f"decoder {model_dir}: quantization {held['quantization']}, linear layers "
              f"{held['decoder_linear_bytes'] / 2**20:.2f} MiB, with embeddings "
              f"{held['decoder_weight_bytes'] / 2**20:.2f} MiB"
              + (f"; {per_layer} linear layers dequantize their weight per forward" if per_layer else ""))
    return model
