"""Paged attention behind one small interface, used by the HF decoder layers through
transformers' AttentionInterface (our function replaces theirs; the layers and weights stay HF's).

KV cache: ``[2, layers, num_blocks * block_size, kv_heads, head_dim]`` (slots = block * size + offset).
Per step, ``StepMeta`` says where each new token's K/V goes (``slot_mapping``) and what context each
sequence attends to. Backends: "sdpa" (portable torch SDPA over gathered blocks; CPU and anywhere),
others may plug in through ``BACKENDS`` (flash-attn on CUDA, torch_npu on Ascend).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_NAME = "tritonvl_paged"


@dataclass
class PrefillPart:
    q_start: int  # rows of the packed step that belong to this chunk
    q_end: int
    ctx_slots: torch.Tensor  # [ctx_len] slots of every position 0..ctx_len-1 (chunk included)
    first_pos: int  # absolute position of the chunk's first token


@dataclass
class StepMeta:
    kv_cache: torch.Tensor  # [2, layers, slots, kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    prefills: list[PrefillPart] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None  # [B] rows of the packed step that are decodes
    decode_slots: torch.Tensor | None = None  # [B, max_ctx] context slots (padded)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_ctx] True where attended


def _write_kv(meta: StepMeta, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    # key/value: [1, kv_heads, T, D] -> rows [T, kv_heads, D]
    meta.kv_cache[0, layer, meta.slot_mapping] = key[0].transpose(0, 1).to(meta.kv_cache.dtype)
    meta.kv_cache[1, layer, meta.slot_mapping] = value[0].transpose(0, 1).to(meta.kv_cache.dtype)


def sdpa_paged(module, query, key, value, attention_mask, scaling=None, tvl_meta: StepMeta | None = None,
               **kwargs):
    """query: [1, heads, T, D] (mRoPE applied); key/value: [1, kv_heads, T, D]. Returns [1, T, heads, D]."""
    meta = tvl_meta
    layer = module.layer_idx
    _write_kv(meta, layer, key, value)
    k_cache, v_cache = meta.kv_cache[0, layer], meta.kv_cache[1, layer]  # [slots, kv_heads, D]
    heads, total = query.shape[1], query.shape[2]
    out = query.new_empty(1, total, heads, query.shape[-1])
    gqa = heads != k_cache.shape[1]
    for part in meta.prefills:
        q = query[:, :, part.q_start:part.q_end]  # [1, H, n, D]
        k = k_cache[part.ctx_slots].transpose(0, 1)[None]  # [1, KVH, ctx, D]
        v = v_cache[part.ctx_slots].transpose(0, 1)[None]
        n, ctx = q.shape[2], k.shape[2]
        # query i (absolute position first_pos + i) sees keys 0..first_pos + i
        mask = torch.arange(ctx, device=q.device)[None, :] <= (part.first_pos + torch.arange(n, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scaling,
                                           enable_gqa=gqa)
        out[0, part.q_start:part.q_end] = o[0].transpose(0, 1)
    if meta.decode_rows is not None:
        rows = meta.decode_rows
        q = query[0, :, rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        k = k_cache[meta.decode_slots].permute(0, 2, 1, 3)  # [B, KVH, ctx, D]
        v = v_cache[meta.decode_slots].permute(0, 2, 1, 3)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=meta.decode_mask,
                                           scale=scaling, enable_gqa=gqa)
        out[0, rows] = o[:, :, 0]
    return out, None


BACKENDS = {"sdpa": sdpa_paged}


def register(backend: str = "sdpa") -> str:
    """Register the chosen backend with transformers under ATTN_NAME; return that name."""
    from transformers import AttentionInterface

    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {sorted(BACKENDS)}")
    AttentionInterface.register(ATTN_NAME, BACKENDS[backend])
    return ATTN_NAME
