"""What the server needs to know about a Qwen VL model directory, read from its own files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tritonvl.handlers.sampling import defaults_from_generation_config

# config.json ``model_type`` -> the family the server runs (weights.py maps each to its classes).
# qwen3_vl_moe: Qwen3-VL with sparse expert MLPs, run by transformers' own expert layers (no fused kernels)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@dataclass(frozen=True)
class ModelInfo:
    """Sizes and token ids of one model directory (Hugging Face layout)."""

    path: str
    family: str  # one of FAMILIES
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    spatial_merge_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    vision_out_hidden: int
    text_hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    # Qwen2.5-VL: temporal mRoPE positions per second of video (second_per_grid_ts scales it)
    tokens_per_second: float = 2.0
    # Qwen3-VL: tower layers whose merged features are added to the first decoder layers' image rows
    deepstack_layers: int = 0
    # the model's own sampling defaults (what generate() would use), from generation_config.json
    sampling_defaults: dict = field(default_factory=dict, hash=False)

    @property
    def timestamps_videos(self) -> bool:
        """Qwen3-VL (dense and MoE): a video's prompt puts ``<t seconds>`` before each temporal patch."""
        return self.family in ("qwen3_vl", "qwen3_vl_moe")

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of ``pixel_values``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches per LLM image token."""
        return self.spatial_merge_size**2

    @property
    def embed_width(self) -> int:
        """Width of one row the vision step sends the llm: the token's embedding, then (Qwen3-VL) its
        deepstack features, side by side."""
        return self.text_hidden * (1 + self.deepstack_layers)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes one token takes: K and V x layers x kv heads x head_dim x element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_model_info(model_dir: str | os.PathLike) -> ModelInfo:
    """Read config.json and generation_config.json of ``model_dir`` (the one place that reads them)."""
    root = Path(model_dir)
    cfg = _read_json(root / "config.json")
    if not cfg:
        raise FileNotFoundError(f"{root}/config.json not found: not a Hugging Face model directory")
    family = family_of(cfg, root)
    text = cfg.get("text_config") or cfg  # transformers 4.x checkpoints keep text fields at top level
    vision = cfg.get("vision_config", {})
    gen = _read_json(root / "generation_config.json")
    eos = gen.get("eos_token_id", cfg.get("eos_token_id", text.get("eos_token_id")))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    heads = text["num_attention_heads"]
    hidden = text["hidden_size"]
    return ModelInfo(
        path=str(root),
        family=family,
        image_token_id=cfg.get("image_token_id", 151655),
        video_token_id=cfg.get("video_token_id", 151656),
        vision_start_token_id=cfg.get("vision_start_token_id", 151652),
        vision_end_token_id=cfg.get("vision_end_token_id", 151653),
        eos_token_ids=eos_ids,
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        in_channels=vision.get("in_chans", vision.get("in_channels", 3)),
        vision_out_hidden=vision.get("out_hidden_size", hidden),
        text_hidden=hidden,
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or hidden // heads,
        vocab_size=text.get("vocab_size", cfg.get("vocab_size")),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        tokens_per_second=float(vision.get("tokens_per_second", 2)),
        deepstack_layers=len(vision.get("deepstack_visual_indexes") or ()),
        sampling_defaults=defaults_from_generation_config(gen),
    )


def family_of(cfg: dict, root: Path) -> str:
    """The family from config.json's ``model_type``; a family the engine cannot run stops the load."""
    kind = cfg.get("model_type", "")
    if kind in FAMILIES:
        return kind
    raise ValueError(f"{root}/config.json: model_type {kind!r} is not a Qwen VL family this server runs "
                     f"(supported: {', '.join(FAMILIES)})")
