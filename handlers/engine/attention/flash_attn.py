"""CUDA with the flash-attn package: one ``flash_attn_varlen_func`` call over the whole packed step
(prefill chunks and decodes) reading the blocks through a block table. flash-attn 2 needs fp16/bf16,
head_dim % 8 == 0 and blocks of a multiple of 256 tokens."""

from __future__ import annotations

from typing import Callable

from .common import paged_view, write_kv
from .meta import StepMeta


def make_flash_attn() -> Callable:
    """The flash-attn backend (imports the package: ImportError when it is missing)."""
    from flash_attn import flash_attn_varlen_func

    def flash_paged(module, query, key, value, attention_mask, scaling=None, tvl_meta: StepMeta | None = None,
                    **kwargs):
        meta = tvl_meta
        layer = module.layer_idx
        write_kv(meta, layer, key, value)
        k_cache, v_cache = paged_view(meta, layer)
        q = query[0].transpose(0, 1)  # [T, H, D], last dim contiguous
        out = flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
                                     softmax_scale=scaling, causal=True, block_table=meta.block_tables)
        return out[None], None

    return flash_paged
