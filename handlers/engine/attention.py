"""Paged attention behind one small interface, used by the HF decoder layers through
transformers' AttentionInterface (our function replaces theirs; the layers and weights stay HF's).

KV cache: ``[2, layers, num_blocks * block_size, kv_heads, head_dim]`` (slot = block * size + offset);
one layer's keys viewed as ``[num_blocks, block_size, kv_heads, head_dim]`` is the paged layout the
kernels read. Per step, ``StepMeta`` says where each new token's K/V goes (``slot_mapping``) and
what each sequence attends to, in the form its backend asks for:

- ``sdpa`` (portable: CPU, CUDA, NPU): torch SDPA over the context gathered from the blocks.
- ``flash_attn`` (CUDA, when the flash-attn package is installed): one ``flash_attn_varlen_func``
  call over the whole packed step (prefill chunks and decodes) reading the blocks through a block
  table. flash-attn 2 needs fp16/bf16, head_dim % 8 == 0 and blocks of a multiple of 256 tokens.
- ``triton`` (CUDA, OpenAI Triton, which ships with torch there): decodes through our paged kernel
  (``triton_lang_decode.py``) reading the blocks through a block table; prefill chunks gathered. For GPUs
  without flash-attn. Blocks: a power of two >= 16.
- ``npu`` (Ascend, torch_npu): decodes through ``npu_fused_infer_attention_score`` over the block
  table (its incremental, paged branch); prefill chunks through the portable gathered path.

A kernel backend is compared with the portable one on the real device when the engine starts
(``self_check``); the engine falls back to ``sdpa`` if it disagrees or fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

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
    block_size: int = 16
    # gathered form (sdpa): prefill chunks and decodes with their context slots
    prefills: list[PrefillPart] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None  # [B] rows of the packed step that are decodes
    decode_slots: torch.Tensor | None = None  # [B, max_ctx] context slots (padded)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_ctx] True where attended
    # paged form (kernels): the sequences listed in ``paged_rows`` order (all of the step's for
    # flash_attn, the decodes for npu); their query rows are contiguous per sequence
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int32 (padded with 0)
    cu_q: torch.Tensor | None = None  # [S + 1] int32 cumulative query lengths
    cu_k: torch.Tensor | None = None  # [S + 1] int32 cumulative context lengths (new tokens included)
    kv_lens: list[int] = field(default_factory=list)  # [S] context lengths
    kv_lens_tensor: torch.Tensor | None = None  # the same, int32 on the device
    max_q: int = 0
    max_k: int = 0


def _write_kv(meta: StepMeta, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    # key/value: [1, kv_heads, T, D] -> rows [T, kv_heads, D]
    meta.kv_cache[0, layer, meta.slot_mapping] = key[0].transpose(0, 1).to(meta.kv_cache.dtype)
    meta.kv_cache[1, layer, meta.slot_mapping] = value[0].transpose(0, 1).to(meta.kv_cache.dtype)


def _paged_view(meta: StepMeta, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's keys and values as [num_blocks, block_size, kv_heads, D] (views, no copy)."""
    shape = (-1, meta.block_size, *meta.kv_cache.shape[-2:])
    return meta.kv_cache[0, layer].view(shape), meta.kv_cache[1, layer].view(shape)


def _gathered_prefills(meta: StepMeta, layer: int, query: torch.Tensor, out: torch.Tensor, scaling) -> None:
    k_cache, v_cache = meta.kv_cache[0, layer], meta.kv_cache[1, layer]  # [slots, kv_heads, D]
    gqa = query.shape[1] != k_cache.shape[1]
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


def with_decode(decode: Callable) -> Callable:
    """An attention function from a decode routine: K/V written, prefill chunks through the gathered
    SDPA path, then ``decode(meta, layer, q [B, H, D], scale) -> [B, H, D]`` for the decode rows.

    Called by HF's layers with query [1, heads, T, D] (mRoPE applied), key/value [1, kv_heads, T, D];
    returns [1, T, heads, D]."""

    def attend(module, query, key, value, attention_mask, scaling=None, tvl_meta: StepMeta | None = None,
               **kwargs):
        meta = tvl_meta
        layer = module.layer_idx
        _write_kv(meta, layer, key, value)
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[-1])
        _gathered_prefills(meta, layer, query, out, scaling)
        if meta.decode_rows is not None:
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            out[0, meta.decode_rows] = decode(meta, layer, query[0, :, meta.decode_rows].transpose(0, 1), scale)
        return out, None

    return attend


def _sdpa_decode(meta: StepMeta, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    k_cache, v_cache = meta.kv_cache[0, layer], meta.kv_cache[1, layer]
    k = k_cache[meta.decode_slots].permute(0, 2, 1, 3)  # [B, KVH, ctx, D]
    v = v_cache[meta.decode_slots].permute(0, 2, 1, 3)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype), attn_mask=meta.decode_mask,
                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[:, :, 0]


sdpa_paged = with_decode(_sdpa_decode)


def make_flash_attn() -> Callable:
    """The flash-attn backend: one varlen call with a block table for the whole packed step."""
    from flash_attn import flash_attn_varlen_func

    def flash_paged(module, query, key, value, attention_mask, scaling=None, tvl_meta: StepMeta | None = None,
                    **kwargs):
        meta = tvl_meta
        layer = module.layer_idx
        _write_kv(meta, layer, key, value)
        k_cache, v_cache = _paged_view(meta, layer)
        q = query[0].transpose(0, 1)  # [T, H, D], last dim contiguous
        out = flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
                                     softmax_scale=scaling, causal=True, block_table=meta.block_tables)
        return out[None], None

    return flash_paged


def make_npu() -> Callable:
    """The Ascend backend: paged decode through torch_npu's fused inference attention."""
    import torch_npu

    fused = torch_npu.npu_fused_infer_attention_score
    scale_kw = ["scale"]  # renamed from scale_value in newer torch_npu; settled on first call

    def npu_decode(meta: StepMeta, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = _paged_view(meta, layer)
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


def make_triton() -> Callable:
    """The OpenAI-Triton backend: paged decode kernel of ours; prefill chunks gathered (sdpa)."""
    from tritonvl.handlers.engine.triton_lang_decode import paged_decode

    def triton_decode(meta: StepMeta, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = _paged_view(meta, layer)
        return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.kv_lens_tensor, scale)

    return with_decode(triton_decode)


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[], Callable]
    device_types: tuple[str, ...]  # where it runs
    prefill: str  # "gathered" or "paged": the form of StepMeta its prefill rows need
    decode: str
    block_multiple: int = 1  # block_size must be a multiple of this
    default_block_size: int = 16
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("sdpa", lambda: sdpa_paged, ("cpu", "cuda", "npu"), "gathered", "gathered"),
    "flash_attn": Backend("flash_attn", make_flash_attn, ("cuda",), "paged", "paged", 256, 256,
                          (torch.float16, torch.bfloat16)),
    "triton": Backend("triton", make_triton, ("cuda",), "gathered", "paged", 16, 16),
    "npu": Backend("npu", make_npu, ("npu",), "gathered", "paged", 128, 128, (torch.float16, torch.bfloat16)),
}


def unavailable(backend: Backend, device: str, dtype: torch.dtype, head_dim: int,
                block_size: int | None = None) -> str | None:
    """Why ``backend`` cannot run here with blocks of ``block_size`` tokens (None: its default)."""
    kind = torch.device(device).type
    if kind not in backend.device_types:
        return f"{backend.name} runs on {'/'.join(backend.device_types)}, not {kind}"
    if backend.dtypes and dtype not in backend.dtypes:
        return f"{backend.name} needs float16 or bfloat16, not {dtype}"
    if backend.name == "flash_attn" and (head_dim % 8 or head_dim > 256):
        return f"flash_attn needs head_dim % 8 == 0 and <= 256, got {head_dim}"
    if backend.name == "triton" and block_size and block_size & (block_size - 1):
        return f"triton needs block_size to be a power of two, got {block_size}"
    if block_size and block_size % backend.block_multiple:
        return f"{backend.name} needs block_size to be a multiple of {backend.block_multiple}, got {block_size}"
    try:
        backend.make()
    except Exception as exc:  # noqa: BLE001 - ImportError, or an ABI mismatch (OSError, RuntimeError)
        return f"{backend.name}: {type(exc).__name__}: {exc}"
    return None


def choose(requested: str, device: str, dtype: torch.dtype, head_dim: int,
           block_size: int | None = None) -> tuple[Backend, str]:
    """The backend to use and why. ``auto``: the device's kernel backend when it can run, else sdpa.
    A backend named explicitly that cannot run raises ValueError naming the reason."""
    if requested == "auto":
        skipped = []
        for name in ("flash_attn", "triton", "npu"):
            reason = unavailable(BACKENDS[name], device, dtype, head_dim, block_size)
            if reason is None:
                return BACKENDS[name], "auto"
            skipped.append(reason)
        return BACKENDS["sdpa"], "auto (" + "; ".join(skipped) + ")"
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend {requested!r}: expected auto or one of {sorted(BACKENDS)}")
    reason = unavailable(BACKENDS[requested], device, dtype, head_dim, block_size)
    if reason is not None:
        raise ValueError(f"attention_backend {requested!r} cannot run: {reason}")
    return BACKENDS[requested], "requested"


def register(fn: Callable) -> str:
    """Register ``fn`` with transformers under ATTN_NAME; return that name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, fn)
    return ATTN_NAME


# ---- building StepMeta from per-sequence facts (shared by the model runner and self_check) ----

@dataclass
class SeqStep:
    """One sequence's part of a step: ``n`` new tokens at positions start..start+n-1 of a sequence whose
    blocks are ``block_table``; the context it attends to is positions 0..start+n-1."""

    row: int
    start: int
    n: int
    block_table: list[int]


def build_meta(backend: Backend, kv_cache: torch.Tensor, block_size: int, parts: list[SeqStep],
               device) -> StepMeta:
    """Vectorised: one padded block table for the step, every slot computed from it in a few ops."""
    qlens = [p.n for p in parts]
    ends = [p.start + p.n for p in parts]
    used = [-(-e // block_size) for e in ends]
    width = max(used)
    tables = torch.tensor([p.block_table[:u] + [0] * (width - u) for p, u in zip(parts, used)], dtype=torch.long)
    q_counts = torch.tensor(qlens)
    seq_of_row = torch.repeat_interleave(torch.arange(len(parts)), q_counts)
    first_row = torch.repeat_interleave(torch.tensor([p.row for p in parts]), q_counts)
    pos = torch.arange(sum(qlens)) - first_row + torch.repeat_interleave(torch.tensor([p.start for p in parts]), q_counts)
    slots = tables[seq_of_row, pos // block_size] * block_size + pos % block_size
    meta = StepMeta(kv_cache, slots.to(device), block_size)
    decodes = [i for i, n in enumerate(qlens) if n == 1]
    if decodes:
        meta.decode_rows = torch.tensor([parts[i].row for i in decodes], device=device)
    if backend.prefill == "gathered" or (decodes and backend.decode == "gathered"):
        arange = torch.arange(block_size)

        def ctx_slots(idx: list[int]) -> torch.Tensor:  # [len(idx), width * block_size]
            return (tables[idx, :, None] * block_size + arange).reshape(len(idx), -1)

        if backend.prefill == "gathered":
            pre = [i for i, n in enumerate(qlens) if n != 1]
            if pre:
                rows = ctx_slots(pre)
                meta.prefills = [PrefillPart(parts[i].row, parts[i].row + qlens[i], rows[j, :ends[i]].to(device),
                                             parts[i].start) for j, i in enumerate(pre)]
        if decodes and backend.decode == "gathered":
            lens = torch.tensor([ends[i] for i in decodes])
            max_ctx = int(lens.max())
            meta.decode_slots = ctx_slots(decodes)[:, :max_ctx].contiguous().to(device)
            mask = torch.arange(max_ctx)[None, :] < lens[:, None]
            meta.decode_slots.masked_fill_(~mask.to(device), 0)
            meta.decode_mask = mask[:, None, None, :].to(device)
    paged = list(range(len(parts))) if backend.prefill == "paged" else decodes if backend.decode == "paged" else []
    if paged:
        sel_lens = [ends[i] for i in paged]
        sel_q = [qlens[i] for i in paged]
        w = max(used[i] for i in paged)
        meta.block_tables = tables[paged, :w].to(torch.int32).to(device)
        meta.kv_lens = sel_lens
        meta.kv_lens_tensor = torch.tensor(sel_lens, dtype=torch.int32, device=device)
        meta.cu_q = torch.tensor([0, *_cumsum(sel_q)], dtype=torch.int32, device=device)
        meta.cu_k = torch.tensor([0, *_cumsum(sel_lens)], dtype=torch.int32, device=device)
        meta.max_q, meta.max_k = max(sel_q), max(sel_lens)
    return meta


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


class _Layer:
    def __init__(self, idx: int) -> None:
        self.layer_idx = idx


def self_check(backend: Backend, fn: Callable, device: str, dtype: torch.dtype, heads: int, kv_heads: int,
               head_dim: int, block_size: int, seed: int = 0) -> str | None:
    """Run ``fn`` and the portable backend on one random mixed step (a chunk of a longer prompt, a
    whole short prompt, two decodes) on ``device``; None when they agree, else what went wrong."""
    gen = torch.Generator().manual_seed(seed)
    # (start, n) per sequence: a second chunk with context, a fresh prompt, two decodes
    shapes = [(block_size + 3, 7), (0, 5), (2 * block_size + 1, 1), (4, 1)]
    need = [-(-(s + n) // block_size) for s, n in shapes]
    perm = torch.randperm(sum(need) + 2, generator=gen).tolist()  # scattered, non-contiguous blocks
    tables, parts, row = [], [], 0
    for (s, n), k in zip(shapes, need):
        tables.append(perm[:k])
        perm = perm[k:]
        parts.append(SeqStep(row, s, n, tables[-1]))
        row += n
    num_blocks = sum(need) + 2
    scale = 1.0 / math.sqrt(head_dim)
    q = torch.randn(1, heads, row, head_dim, generator=gen)
    k = torch.randn(1, kv_heads, row, head_dim, generator=gen)
    v = torch.randn(1, kv_heads, row, head_dim, generator=gen)
    old = torch.randn(2, 1, num_blocks * block_size, kv_heads, head_dim, generator=gen)
    try:
        ref_cache = old.clone().to(device)
        ref_meta = build_meta(BACKENDS["sdpa"], ref_cache, block_size, parts, device)
        ref, _ = sdpa_paged(_Layer(0), q.to(device), k.to(device), v.to(device), None, scale, tvl_meta=ref_meta)
        cache = old.to(device, dtype)
        meta = build_meta(backend, cache, block_size, parts, device)
        got, _ = fn(_Layer(0), q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), None, scale,
                    tvl_meta=meta)
        err = (got.float() - ref.float()).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this backend"
        return f"{backend.name} failed on a test step: {type(exc).__name__}: {exc}"
    tol = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not err <= tol:
        return f"{backend.name} differs from sdpa by {err:.3g} (> {tol}) on a test step"
    return None
