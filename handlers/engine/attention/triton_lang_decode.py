"""Paged decode attention written in OpenAI Triton (the GPU language that ships with torch on CUDA).

For CUDA machines without flash-attn (the NGC Triton image has none): each decode query reads its
keys and values straight from the KV blocks through the block table, instead of gathering the
whole context into a new tensor in every layer as the portable path does.

One program per (sequence, KV head) handles the query heads of that KV group together (GQA), walks
the sequence's blocks with an online softmax, and writes [heads_in_group, head_dim]. Everything is
computed in fp32 (ieee dots: decode reads far more bytes than it computes, so tensor cores would
not pay, and the interpreter cannot do bf16 dots).
``TRITON_INTERPRET=1`` runs the same kernel on the CPU (the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, lens_ptr, scale,
                         sq_b, sq_h, sk_blk, sk_t, sk_h, so_b, so_h, st_b,
                         GROUP: tl.constexpr, GROUP_P: tl.constexpr, BS: tl.constexpr,
                         D: tl.constexpr, D_P: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    hrange = tl.arange(0, GROUP_P)
    heads = g * GROUP + hrange
    hmask = hrange < GROUP
    d = tl.arange(0, D_P)
    dmask = d < D
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    length = tl.load(lens_ptr + b)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D_P], tl.float32)
    t = tl.arange(0, BS)
    for j in range(0, tl.cdiv(length, BS)):
        blk = tl.load(tables_ptr + b * st_b + j).to(tl.int64)
        tmask = j * BS + t < length
        off = blk * sk_blk + t[:, None] * sk_t + g * sk_h + d[None, :]
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + off, mask=kvmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=kvmask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(tmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = tl.dot(p, v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=hmask[:, None] & dmask[None, :])


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D]; k/v_cache [num_blocks, block_size, KVH, D]; block_tables int32 [B, W]; lens int32 [B]
    (context length incl. the new token). Returns [B, H, D] in q's dtype."""
    batch, heads, dim = q.shape
    _, bs, kvh, _ = k_cache.shape
    group = heads // kvh
    out = torch.empty_like(q)
    # tl.dot wants every side >= 16: pad the head group and head_dim (masked), blocks are >= 16
    _paged_decode_kernel[(batch, kvh)](
        q, k_cache, v_cache, out, block_tables, lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), BS=bs,
        D=dim, D_P=max(16, triton.next_power_of_2(dim)))
    return out
