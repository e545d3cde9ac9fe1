"""The output layer: a step's sampled hidden rows -> logits [n, vocab], or each row's greedy id.

On CPU the [vocab, hidden] weight is re-laid once at load as vocabulary blocks: ``blocks[j]`` is the
contiguous [hidden, BLOCK] slice of columns j*BLOCK.. of W.T (the rows past the last whole block in
``tail``). A batch-1 step then reads the weight as a few long contiguous GEMVs at memory bandwidth;
``F.linear`` on the row-major weight ran the same product at about half that on these CPUs (the
whole step at batch 1 is mostly this read: 311 MB on the bench preset). For 2+ rows an fp32 head
also keeps oneDNN's packed copy of the weight (onednn.py, what inductor's CPU linear
uses): its GEMM ran 25-40% faster than MKL's or the blocks' on 4-32 rows here (MKL's sgemm reaches
about half of this AMD CPU's peak); that copy costs the head's size again in memory, so it is made
only for heads up to PACK_MAX_BYTES. Elsewhere (CUDA, NPU), or for an output layer with a bias or a
non-float weight, it is the module's own forward. docs/BENCHMARKS.md ("Against OpenVINO GenAI") has
the figures.

Greedy rows of small steps (up to SCREEN_ROWS) take their ids through ``GreedyScreen``: an int8 copy
of an fp32 CPU weight (a quarter of its bytes) gives every logit within a proven error bound, and only
the vocabulary entries that can still be the maximum are computed again in fp32 from the weight. The
ids are those of the fp32 logits; the step reads about a quarter of the head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import onednn

BLOCK = 4096  # vocabulary columns per block (8 MB of fp32 weight at hidden 512)
PACK_MAX_BYTES = 1 << 30  # a bigger head (7B+ in fp32) is not copied again: the blocks serve 2+ rows too
SCREEN_ROWS = 4  # greedy steps of up to this many rows screen with the int8 copy (past it the fp32 GEMM wins)
SCREEN_MAX_CANDIDATES = 1024  # more entries than this left in play for a row: the whole fp32 product instead
CHUNK_ELEMENTS = 1 << 22  # weight elements converted at a time while the int8 copy is made (no whole-size temporary)


class OutputHead:
    """``logits(h)`` -> [n, vocab] float; ``argmax(h)`` -> each row's greedy id (the first of equal
    maxima, as ``torch.argmax`` over ``logits(h)``: both read the same products)."""

    def __init__(self, lm_head: nn.Module) -> None:
        self.module = lm_head
        self.vocab = lm_head.weight.shape[0]

    @classmethod
    def build(cls, lm_head: nn.Module, device, embeddings: nn.Module | None = None,
              screen: bool = True) -> OutputHead:
        """The blocked head on CPU for a plain bias-free float ``nn.Linear``, else the module itself.
        An untied output weight is released once blocked (``embeddings``: the input embedding, whose
        weight a tied head shares and must keep). ``screen``: greedy steps screen with an int8 copy
        of an fp32 weight (GreedyScreen)."""
        w = getattr(lm_head, "weight", None)
        plain = (type(lm_head) is nn.Linear and lm_head.bias is None and isinstance(w, torch.Tensor)
                 and w.dtype in (torch.float32, torch.bfloat16, torch.float16) and not w.is_meta)
        if str(device).split(":")[0] != "cpu" or not plain:
            return cls(lm_head)
        tied = embeddings is not None and getattr(embeddings, "weight", None) is w
        return BlockedHead(lm_head, release=not tied, screen=screen)

    @property
    def weight_bytes(self) -> int:
        """Bytes of output weight a step reads."""
        w = self.module.weight
        return w.numel() * w.element_size()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h).float()

    def argmax(self, h: torch.Tensor) -> list[int]:
        return self.logits(h).argmax(dim=-1).tolist()


class BlockedHead(OutputHead):
    def __init__(self, lm_head: nn.Linear, release: bool = True, screen: bool = True) -> None:
        w = lm_head.weight.detach()
        self.vocab, hidden = w.shape
        self.screen = GreedyScreen.build(w) if screen else None
        self.nb = self.vocab // BLOCK
        cut = self.nb * BLOCK
        # [nb, hidden, BLOCK]: block j is columns j*BLOCK.. of W.T, contiguous
        self.blocks = w[:cut].reshape(self.nb, BLOCK, hidden).transpose(1, 2).contiguous()
        self.tail = w[cut:].T.contiguous() if cut < self.vocab else None  # [hidden, vocab - cut]
        small = w.numel() * w.element_size() <= PACK_MAX_BYTES
        self.packed = onednn.pack(w) if small else None  # for 2+ rows (fp32 only)
        self.module = None
        if release:  # nothing else reads an untied output weight (the engine calls no model forward)
            lm_head.weight = None

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.blocks, self.tail) if t is not None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and h.shape[0] > 1:
            return onednn.linear(h.float(), self.packed, None)
        h = h.to(self.blocks.dtype)
        out = torch.matmul(h, self.blocks).permute(1, 0, 2).reshape(h.shape[0], self.nb * BLOCK)  # [nb, n, B] -> [n, nb*B]
        return (torch.cat([out, h @ self.tail], dim=1) if self.tail is not None else out).float()

    def argmax(self, h: torch.Tensor) -> list[int]:
        if self.screen is not None and h.shape[0] <= SCREEN_ROWS:
            ids = self.screen.argmax(h.float(), self._exact)
            if ids is not None:
                return ids
        return first_argmax(self._logits(h)).tolist()

    def _exact(self, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """fp32 logits of vocabulary entries ``cols`` (ascending) for rows ``h``: [n, len(cols)]."""
        cut = self.nb * BLOCK
        head = cols[cols < cut]
        rows = [self.blocks[head // BLOCK, :, head % BLOCK]]  # [k, hidden]: those entries' weight rows
        if len(head) < len(cols):
            rows.append(self.tail[:, cols[len(head):] - cut].T)
        return h @ torch.cat(rows).float().T


class GreedyScreen:
    """Each row's greedy id of ``h @ W.T`` from an int8 copy of the fp32 weight ``W``.

    W is kept as ``q * s`` (per vocabulary entry i: ``s_i`` the bfloat16 at or above max|W_i| / 127,
    ``q_i = round(W_i / s_i)`` in int8; ``e_i = W_i - q_i s_i`` the rounding, whose norm is kept), and
    torch's int8 weight GEMM (h rounded to bfloat16 as h~, products q s exact in fp32, fp32 sums,
    bfloat16 out) gives approximate logits y~. Since h.W_i = h~.(q_i s_i) + h.e_i + (h - h~).(q_i s_i),
    entry i's differs from the exact one by at most

        E_i = |h|_2 |e_i|_2  +  (|h - h~|_2 + 1e-4 |h|_2) |q_i s_i|_2  +  2^-7 max_k |y~_k|

    (Cauchy-Schwarz on both terms; the fp32 sums; the bfloat16 output), so the exact maximum is among
    the entries with y~_i + E_i >= max_k (y~_k - E_k). Those few are computed again in fp32 from W and
    the first of their maxima is the id. Measured error on random weights and inputs: well inside E.
    A non-finite row or more than SCREEN_MAX_CANDIDATES entries per row left: None (the caller runs
    the whole fp32 product)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, rounding: torch.Tensor) -> None:
        self.q, self.scales = q, scales  # [vocab, hidden] int8, [vocab] bfloat16
        s = scales.float()
        rows = max(1, CHUNK_ELEMENTS // q.shape[1])
        norms = torch.cat([part.float().norm(dim=1) for part in q.split(rows)]) * s
        self.coef = torch.stack([rounding, norms])  # [2, vocab]: |e_i|_2 and |q_i s_i|_2, E_i's factors

    @classmethod
    def build(cls, w: torch.Tensor) -> GreedyScreen | None:
        """For an fp32 CPU weight where this torch runs the int8 GEMM; else None. Hidden sizes that are
        not a multiple of 16 are left out: the kernel reads the activations 16 at a time (aligned;
        torch 2.13 on AVX2 crashed on rows of 8, 24 or 100)."""
        if (w.dtype != torch.float32 or w.device.type != "cpu" or w.shape[1] % 16
                or not hasattr(torch, "_weight_int8pack_mm")):
            return None
        vocab, hidden = w.shape
        q = torch.empty(vocab, hidden, dtype=torch.int8)
        scales = torch.empty(vocab, dtype=torch.bfloat16)
        rounding = torch.empty(vocab)
        rows = max(1, CHUNK_ELEMENTS // hidden)
        for lo in range(0, vocab, rows):  # a chunk at a time: no temporary of the whole weight's size
            part = w[lo:lo + rows]
            s = _bf16_at_least(part.abs().amax(dim=1) / 127)
            qf = torch.round(part / s.float()[:, None]).clamp_(-127, 127)
            q[lo:lo + rows], scales[lo:lo + rows] = qf.to(torch.int8), s
            # the rounding's norm: q s is exact in fp32 (7 by 8 significant bits), W - q s too (Sterbenz: they
            # are within a factor 2, or q is 0); the norm's fp32 sum errs by under hidden * 2^-24 relative
            rounding[lo:lo + rows] = (part - qf * s.float()[:, None]).norm(dim=1) * (1 + 1e-4 + hidden * 2 ** -23)
        screen = cls(q, scales, rounding)
        try:  # the kernel exists for this build, stays within the bound and gives the product's ids
            probe = torch.randn(2, hidden, generator=torch.Generator().manual_seed(0))
            y, err = screen.approx(probe)
            for lo in range(0, vocab, rows):
                gap = (probe.double() @ w[lo:lo + rows].double().T - y[:, lo:lo + rows].double()).abs()
                if not bool((gap <= err[:, lo:lo + rows].double()).all()):
                    return None
            ids = screen.argmax(probe, lambda h, cols: h @ w[cols].T)
        except (RuntimeError, NotImplementedError):
            return None
        agrees = ids is None or ids == (probe @ w.T).argmax(dim=-1).tolist()  # None: undecided, fp32 answers
        return screen if agrees else None

    def approx(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 product's logits y~ [n, vocab] and each one's error bound E [n, vocab]."""
        rough = h.to(torch.bfloat16).contiguous()  # h~: what the kernel reads
        y = torch._weight_int8pack_mm(rough, self.q, self.scales).float()
        size_h = h.norm(dim=1)
        norms = torch.stack([size_h, (h - rough.float()).norm(dim=1) + 1e-4 * size_h], dim=1)
        return y, torch.addmm(2 ** -7 * y.abs().amax(dim=1, keepdim=True), norms, self.coef)

    def argmax(self, h: torch.Tensor, exact) -> list[int] | None:
        """``exact(h, cols)``: the fp32 logits [n, len(cols)] of vocabulary entries ``cols`` (ascending)."""
        y, err = self.approx(h)
        if not bool(torch.isfinite(err).all()):  # a non-finite y~ (its max is in every E) or h
            return None
        live = (y + err) >= (y - err).amax(dim=1, keepdim=True)  # entries that may still be a row's maximum
        counts = live.sum(dim=1).tolist()
        if max(counts) > SCREEN_MAX_CANDIDATES:
            return None
        ids = []
        for row, cols in enumerate(live.nonzero()[:, 1].split(counts)):  # each row's own few, ascending
            logits = exact(h[row:row + 1], cols)[0]
            ids.append(int(cols[logits.argmax()]))  # the first of equal maxima
        return ids


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The bfloat16 nearest ``x`` (positive fp32), moved up one step where that fell below ``x``; zeros
    become the smallest normal (a zero row's q is all zero either way)."""
    x = x.clamp_min(torch.finfo(torch.bfloat16).tiny)
    b = x.to(torch.bfloat16)
    bits = b.view(torch.int16).clone()
    bits += (b.float() < x).to(torch.int16)  # positive bfloat16s order as their bit patterns
    return bits.view(torch.bfloat16)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for [n, vocab] logits (the first of equal maxima), by way of ``amax``: each
    row's maximum per BLOCK columns (amax is vectorised; torch's CPU argmax ran ~4x slower: 10.4 against
    2.4 ms over [32, 151936]), then argmax inside the first block that holds it."""
    n, vocab = x.shape
    nb = vocab // BLOCK
    if nb < 2 or not x.is_contiguous():
        return x.argmax(dim=-1)
    cut = nb * BLOCK
    blocks = x[:, :cut].view(n, nb, BLOCK)
    block_max = blocks.amax(dim=-1)  # [n, nb]
    best = block_max.amax(dim=-1)  # [n]
    j = (block_max == best[:, None]).to(torch.uint8).argmax(dim=-1)  # the first block holding it
    rows = torch.arange(n, device=x.device)
    ids = blocks[rows, j].argmax(dim=-1) + j * BLOCK
    if cut < vocab:  # the tail wins only when strictly greater (it comes last)
        tail = x[:, cut:]
        ids = torch.where(tail.amax(dim=-1) > best, tail.argmax(dim=-1) + cut, ids)
    return ids
