"""What every backend shares: writing the new K/V, the paged view of one layer, the gathered prefill
path (SDPA over context gathered from the blocks), and ``with_decode`` to build an attention
function from a decode routine."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .meta import StepMeta


def write_kv(meta: StepMeta, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    # key/value: [1, kv_heads, T, D] -> rows [T, kv_heads, D]
    meta.kv_cache[0, layer, meta.slot_mapping] = key[0].transpose(0, 1).to(meta.kv_cache.dtype)
    meta.kv_cache[1, layer, meta.slot_mapping] = value[0].transpose(0, 1).to(meta.kv_cache.dtype)


def paged_view(meta: StepMeta, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's keys and values as [num_blocks, block_size, kv_heads, D] (views, no copy)."""
    shape = (-1, meta.block_size, *meta.kv_cache.shape[-2:])
    return meta.kv_cache[0, layer].view(shape), meta.kv_cache[1, layer].view(shape)


def gathered_prefills(meta: StepMeta, layer: int, query: torch.Tensor, out: torch.Tensor, scaling) -> None:
    k_cache, v_cache = meta.kv_cache[0, layer], meta.kv_cache[1, layer]  # [slots, kv_heads, D]
    gqa = query.shape[1] != k_cache.shape[1]
    for part in meta.prefills:
        q = query[:, :, part.q_start:part.q_end]  # [1, H, n, D]
        k = k_cache.index_select(0, part.ctx_slots).transpose(0, 1)[None]  # [1, KVH, ctx, D]
        v = v_cache.index_select(0, part.ctx_slots).transpose(0, 1)[None]
        n, ctx = q.shape[2], k.shape[2]
        # query i (absolute position first_pos + i) sees keys 0..first_pos + i
        mask = torch.arange(ctx, device=q.device)[None, :] <= (part.first_pos + torch.arange(n, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scaling,
                                           enable_gqa=gqa)
        out[0, part.q_start:part.q_end] = o[0].transpose(0, 1)


def with_decode(decode: Callable) -> Callable:
    """An attention function from a decode routine: K/V written, prefill chunks through the gathered
    SDPA path, then ``decode(meta, layer, q [B, H, D], scale) -> [B, H, D]`` for the decode rows.

    Called by HF's layers with query [1, heads, T, D] (mRoPE applied), key/value [1, kv_heads, T, D];
    returns [1, T, heads, D]."""

    def attend(module, query, key, value, attention_mask, scaling=None, tvl_meta: StepMeta | None = None,
               **kwargs):
        meta = tvl_meta
        layer = module.layer_idx
        write_kv(meta, layer, key, value)
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        if meta.all_decode:  # a decode-only step: no prefill, every row in order
            return decode(meta, layer, query[0].transpose(0, 1), scale)[None], None
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[-1])
        gathered_prefills(meta, layer, query, out, scaling)
        if meta.decode_rows is not None:
            out[0, meta.decode_rows] = decode(meta, layer, query[0, :, meta.decode_rows].transpose(0, 1), scale)
        return out, None

    return attend
