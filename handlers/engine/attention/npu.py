"""Ascend (torch_npu): decodes through ``npu_fused_infer_attention_score`` over the block table (its
incremental, paged branch); prefill chunks through the portable gathered path."""

from __future__ import annotations

from typing import Callable

import torch

from .common import paged_view, with_decode
from .meta import StepMeta


def make_npu() -> Callable:
    """The Ascend backend: paged decode through torch_npu's fused inference attention."""
    import torch_npu

    fused = torch_npu.npu_fused_infer_attention_score
    scale_kw = ["scale"]  # renamed from scale_value in newer torch_npu; settled on first call

    def npu_decode(meta: StepMeta, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = paged_view(meta, layer)
        nb, bs, kvh, dim = k_cache.shape
        batch, heads, _ = q.shape
        q = q.reshape(batch, 1, heads * dim).contiguous()
        args = dict(block_table=meta.block_tables, actual_seq_lengths_kv=meta.kv_lens, num_heads=heads,
                    num_key_value_heads=kvh, input_layout="BSH", block_size=bs)
        kc, vc = k_cache.view(nb, bs, kvh * dim), v_cache.view(nb, bs, kvh * dim)
        try:
            o = fused(q, kc, vc, **args, **{scale_kw[0]: scale})[0]
        except TypeError:
            scale_kw[0] = "scale_value" if scale_kw[0] == "scale" else "scale"
            o = fused(q, kc, vc, **args, **{scale_kw[0]: scale})[0]
        return o.reshape(batch, heads, dim)

    return with_decode(npu_decode)
