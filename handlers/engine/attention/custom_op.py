"""Paged attention as one ``torch.library`` custom op, so a ``torch.compile``d decoder traces through
the HF layers without a graph break at attention (handlers/engine/compiled.py).

``tritonvl::paged_attention(query, key, value, layer, scale)`` takes what an HF layer hands its
attention function ([1, heads, T, D] / [1, kv_heads, T, D], T = the padded bucket) and returns
[1, T, heads, D]. Everything else a step's attention needs (the KV cache, the StepMeta, the selected
backend's function) is not an input of the graph: it is the step's ``StepContext``, set on the
engine thread by ``stepping()`` around the compiled call, as vLLM's forward context. The op is
opaque to inductor (it sees only the fake implementation's shapes), so each backend keeps its own
kernel; the graph does not change with the context length.

Padded rows (a decode batch padded up to a bucket): the StepMeta is built for the real rows only, so
the op runs the backend on the first ``meta.slot_mapping.numel()`` rows (K/V written for them alone)
and returns zeros for the rest. For CUDA-graph capture (a static replay cannot read a new StepMeta)
the context is a ``StaticDecode`` of fixed buffers instead; see its docstring.

``dispatching(fn)``: the function the engine registers with transformers when the step is compiled:
eager steps still pass ``tvl_meta=`` and reach ``fn`` directly; the compiled decoder passes none and
reaches the op.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .common import paged_view
from .meta import StepMeta


@dataclass
class StaticDecode:
    """A decode bucket's fixed buffers (CUDA graphs: the replay reads these addresses). Every row is
    run: rows past the real batch have ``row_src`` 0 (their K/V write repeats row 0's, same slot,
    same values) and ``kv_lens`` 0 (the kernel reads no block for them)."""

    kv_cache: torch.Tensor
    block_size: int
    slot_mapping: torch.Tensor  # [Bp] long
    row_src: torch.Tensor  # [Bp] long: the row whose K/V each row writes (itself, or 0 for padding)
    block_tables: torch.Tensor  # [Bp, max_blocks] int32
    kv_lens: torch.Tensor  # [Bp] int32
    decode: Callable  # (q [Bp, H, D], k_cache, v_cache, block_tables, kv_lens, scale) -> [Bp, H, D]


class _Context(threading.local):
    meta: StepMeta | StaticDecode | None = None
    fn: Callable | None = None  # the backend's attention function (registry.Selected.fn)


STEP = _Context()


@contextmanager
def stepping(meta, fn: Callable | None):
    """The step's attention context on this thread, for the op calls of the compiled decoder."""
    old = STEP.meta, STEP.fn
    STEP.meta, STEP.fn = meta, fn
    try:
        yield
    finally:
        STEP.meta, STEP.fn = old


class _Layer:
    def __init__(self, idx: int) -> None:
        self.layer_idx = idx


_LAYERS: dict[int, _Layer] = {}


@torch.library.custom_op("tritonvl::paged_attention", mutates_args=())
def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                    scale: float) -> torch.Tensor:
    meta = STEP.meta
    if meta is None:
        raise RuntimeError("tritonvl::paged_attention called outside a step (no attention context set)")
    if isinstance(meta, StaticDecode):
        return _static_decode(meta, query, key, value, layer, scale)
    module = _LAYERS.setdefault(layer, _Layer(layer))
    n, total = meta.slot_mapping.numel(), query.shape[2]
    if n == total:
        out, _ = STEP.fn(module, query, key, value, None, scale, tvl_meta=meta)
        return out
    out = query.new_zeros(1, total, query.shape[1], query.shape[3])
    real, _ = STEP.fn(module, query[:, :, :n], key[:, :, :n], value[:, :, :n], None, scale, tvl_meta=meta)
    out[:, :n] = real
    return out


@paged_attention.register_fake
def _(query, key, value, layer, scale):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])


def _static_decode(meta: StaticDecode, query, key, value, layer: int, scale: float) -> torch.Tensor:
    """Every row of the bucket, with static shapes and addresses only (capturable)."""
    k_rows = key[0].transpose(0, 1).index_select(0, meta.row_src)  # [Bp, KVH, D]
    v_rows = value[0].transpose(0, 1).index_select(0, meta.row_src)
    cache = meta.kv_cache
    cache[0, layer].index_copy_(0, meta.slot_mapping, k_rows.to(cache.dtype))
    cache[1, layer].index_copy_(0, meta.slot_mapping, v_rows.to(cache.dtype))
    k_cache, v_cache = paged_view(meta, layer)
    o = meta.decode(query[0].transpose(0, 1).contiguous(), k_cache, v_cache, meta.block_tables, meta.kv_lens, scale)
    return o[None].contiguous()  # [1, Bp, H, D]


_DISPATCHING: dict[Callable, Callable] = {}


def dispatching(fn: Callable) -> Callable:
    """``fn`` for eager steps (``tvl_meta`` given), the custom op for the compiled decoder (none given).
    One wrapper per ``fn`` in a process: a compiled graph guards on the function its layers look up,
    so a second compiled engine on the same backend must not replace the first one's."""
    if fn in _DISPATCHING:
        return _DISPATCHING[fn]

    def attend(module, query, key, value, attention_mask, scaling=None, tvl_meta: StepMeta | None = None,
               **kwargs):
        if tvl_meta is not None:
            return fn(module, query, key, value, attention_mask, scaling, tvl_meta=tvl_meta, **kwargs)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        return torch.ops.tritonvl.paged_attention(query, key, value, module.layer_idx, scale), None

    _DISPATCHING[fn] = attend
    return attend
