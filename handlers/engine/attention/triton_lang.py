"""The ``triton`` backend: CUDA via OpenAI Triton (the GPU language that ships with torch there, not
the Triton Inference Server). Decodes through our paged kernel (``triton_lang_decode.py``) reading the
blocks through a block table; prefill chunks gathered. For GPUs without flash-attn. Blocks: a power
of two >= 16."""

from __future__ import annotations

from typing import Callable

import torch

from .common import paged_view, with_decode
from .meta import StepMeta


def make_triton() -> Callable:
    """The OpenAI-Triton backend (imports triton: ImportError when it is missing)."""
    from .triton_lang_decode import paged_decode

    def triton_decode(meta: StepMeta, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = paged_view(meta, layer)
        return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.kv_lens_tensor, scale)

    return with_decode(triton_decode)
