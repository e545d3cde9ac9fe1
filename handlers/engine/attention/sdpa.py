"""The portable backend (CPU, CUDA, NPU): torch SDPA over the context gathered from the blocks.
Also the reference every kernel backend is checked against at start-up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import with_decode
from .meta import StepMeta


def _sdpa_decode(meta: StepMeta, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    k_cache, v_cache = meta.kv_cache[0, layer], meta.kv_cache[1, layer]
    k = k_cache[meta.decode_slots].permute(0, 2, 1, 3)  # [B, KVH, ctx, D]
    v = v_cache[meta.decode_slots].permute(0, 2, 1, 3)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype), attn_mask=meta.decode_mask,
                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[:, :, 0]


sdpa_paged = with_decode(_sdpa_decode)
