"""``StepMeta``: what one step's attention needs, built once per step from per-sequence facts.

KV cache: ``[2, layers, num_blocks * block_size, kv_heads, head_dim]`` (slot = block * size + offset).
``slot_mapping`` says where each new token's K/V goes; the rest says what each sequence attends to,
in the form its backend asks for (``Backend.prefill`` / ``Backend.decode``: "gathered" or "paged").
Used by the model runner every step and by the start-up self-check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .registry import Backend


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
    all_decode: bool = False  # every row of the step is a decode, rows in order (decode_rows is 0..T-1)


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
        meta.all_decode = len(decodes) == len(parts)  # rows 0..T-1 then (ModelRunner.pack places them in order)
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
