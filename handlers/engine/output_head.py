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

Greedy steps take their ids through ``GreedyScreen``: an int8 copy of an fp32 CPU weight (a quarter
of its bytes) gives every logit within a proven error bound, and only the vocabulary entries that can
still be the maximum are computed again in fp32 from the weight. The ids are those of the fp32 logits.
On CPUs with VNNI the int8 GEMM (int8 activations too) screens steps of any size (32 rows: 10 ms
against the fp32 GEMM's 32 on the bench preset's head); elsewhere a bfloat16-activation kernel screens
steps of up to SCREEN_ROWS rows (it reads about a quarter of the head's bytes).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from . import onednn

log = logging.getLogger("tritonvl.engine")

BLOCK = 4096  # vocabulary columns per block (8 MB of fp32 weight at hidden 512)
PACK_MAX_BYTES = 1 << 30  # a bigger head (7B+ in fp32) is not copied again: the blocks serve 2+ rows too
SCREEN_ROWS = 4  # the bf16 kernel screens steps of up to this many rows (past it the fp32 GEMM wins)
U8_ROWS = 48  # rows per call of the u8 kernel (oneDNN's int8 GEMM here: 10 ms at 32 rows, 14 at 48, 34 at 64)
OUTLIER_RATIO = 8.0  # a channel this many times the step's rms value goes around the u8 kernel (in fp32)
MAX_OUTLIERS = 16  # at most this many such channels per step
MISS_WINDOW = 64  # a screen that cannot decide on more than a quarter of its first this many steps turns off
SCREEN_MAX_CANDIDATES = 1024  # more entries than this left in play for a row: the whole fp32 product instead
SPAN = 64  # the screen looks for candidates in spans of this many vocabulary entries (their maxima first)
SCREEN_MAX_SPANS = 128  # more spans than this in play for a row: the whole fp32 product instead
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
        down = torch.arange(hidden)  # flat offsets down one vocabulary entry's column (see _exact)
        self._down_blocks = down * BLOCK
        self._down_tail = down * (self.vocab - cut)
        small = w.numel() * w.element_size() <= PACK_MAX_BYTES
        self.packed = onednn.pack(w) if small else None  # for 2+ rows (fp32 only)
        if self.screen is not None:
            self.screen.columns = self._columns
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
        if self.screen is not None and self.screen.takes(h.shape[0]):
            ids = self.screen.argmax(h.float(), self._exact)
            if ids is not None:
                return ids
        return first_argmax(self._logits(h)).tolist()

    def _columns(self, ks: torch.Tensor) -> torch.Tensor:
        """The weight's columns ``ks`` (hidden channels) as [len(ks), vocab] fp32: rows of the blocks."""
        parts = [self.blocks[:, ks, :].permute(1, 0, 2).reshape(len(ks), -1)]
        if self.tail is not None:
            parts.append(self.tail[ks])
        return torch.cat(parts, dim=1).float()

    def _exact(self, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """fp32 logits of vocabulary entries ``cols`` (ascending) for rows ``h``: [n, len(cols)]."""
        cut, hidden = self.nb * BLOCK, self.blocks.shape[1]
        head = cols[cols < cut]  # entry c is blocks[c // BLOCK, :, c % BLOCK]: gathered as flat offsets
        start = (head // BLOCK) * (hidden * BLOCK) + head % BLOCK
        rows = [torch.take(self.blocks, start[:, None] + self._down_blocks)]  # [k, hidden]: those entries' rows
        if len(head) < len(cols):
            rows.append(torch.take(self.tail, (cols[len(head):] - cut)[:, None] + self._down_tail))
        return h @ torch.cat(rows).float().T


class GreedyScreen:
    """Each row's greedy id of ``h @ W.T`` from an int8 copy of the fp32 weight ``W``.

    W is kept as ``q * s`` (per vocabulary entry i: ``s_i`` the bfloat16 at or above max|W_i| / 127,
    ``q_i = round(W_i / s_i)`` in int8; ``e_i = W_i - q_i s_i`` the rounding, whose norm is kept). One of
    two kernels gives approximate logits y~ from the rounded input h~:

    - ``u8`` (CPUs with VNNI): oneDNN's int8 GEMM. h~ = k sx with sx = max|h| / 127 over the step and
      k = round(h / sx) in [-127, 127], sent as bytes k + 128; the products are summed exactly in int32 and
      scaled by sx s_i in fp32. Any number of rows (in chunks of U8_ROWS).
    - ``bf16``: torch's int8 weight GEMM on h~ = bfloat16(h) (products q s exact in fp32, fp32 sums,
      bfloat16 out). Up to SCREEN_ROWS rows (past that it loses to the fp32 GEMM).

    Since h.W_i = h~.(q_i s_i) + h.e_i + (h - h~).(q_i s_i), entry i's y~ differs from the exact logit by
    at most

        E_i = (1 + c) |h|_2 |e_i|_2  +  (|h - h~|_2 + c |h|_2) |q_i s_i|_2  +  out_i

    (Cauchy-Schwarz on both terms; c = 1e-4 + hidden * 2^-23 covers fp32 sums, the reference's among
    them; out_i the kernel's output rounding: 2^-7 max_k |y~_k| for bfloat16, 2^-16 hidden (127 sx)
    (127 s_i) for u8, far above fp32 scaling of an exact int32 sum), so the exact maximum is among the
    entries with y~_i + E_i >= max_k (y~_k - E_k). Those few are computed again in fp32 from W and the
    first of their maxima is the id. The bound is checked against float64 products at load.
    A non-finite row or more than SCREEN_MAX_CANDIDATES entries left for a row: None (the caller runs
    the whole fp32 product); a screen that answers None on more than a quarter of its first MISS_WINDOW
    calls turns itself off (hidden states whose outliers make the bound too wide for it to pay)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, rounding: torch.Tensor, kernel: str) -> None:
        self.kernel, self.hidden = kernel, q.shape[1]
        s = scales.float()
        rows = max(1, CHUNK_ELEMENTS // q.shape[1])
        norms = torch.cat([part.float().norm(dim=1) for part in q.split(rows)]) * s
        # [4, vocab]: E_i = F_r @ coef[:, i] for a row's factors F_r (see _factors)
        self.coef = torch.stack([rounding, norms, 127 * s, torch.ones_like(s)])
        self.coef_t = self.coef.T.contiguous()  # [vocab, 4]: an entry's factors side by side (gathered per entry)
        self.coef_max = self.coef.amax(dim=1)  # F_r @ coef_max >= every E_i of row r
        self.max_rows = U8_ROWS if kernel == "u8" else SCREEN_ROWS  # per kernel call
        self.calls = self.misses = 0
        self.on = True
        self.columns = None  # ks -> the fp32 weight's columns ks as [len(ks), vocab] (set by the head; see _split)
        if kernel == "u8":
            self.packed = onednn.pack_u8(q, U8_ROWS)
            self.w_scales, self.w_zeros = s, torch.zeros(len(s), dtype=torch.int64)
        else:
            self.q, self.scales = q, scales

    @classmethod
    def build(cls, w: torch.Tensor, kernels: tuple[str, ...] = ("u8", "bf16")) -> GreedyScreen | None:
        """For an fp32 CPU weight, with the first of ``kernels`` that this torch and CPU run, that stays
        within the bound and gives the product's ids on probe inputs; else None. ``bf16`` needs a hidden
        size that is a multiple of 16 (the kernel reads the activations 16 at a time, aligned: torch 2.13
        on AVX2 crashed on rows of 8, 24 or 100)."""
        usable = {"u8": onednn.has_u8_gemm(), "bf16": hasattr(torch, "_weight_int8pack_mm") and w.shape[1] % 16 == 0}
        kernels = [k for k in kernels if usable[k]]
        if w.dtype != torch.float32 or w.device.type != "cpu" or not kernels:
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
        for kernel in kernels:
            try:
                screen = cls(q, scales, rounding, kernel)
                if screen._passes_checks(w):
                    return screen
            except (RuntimeError, NotImplementedError):
                continue
        return None

    def _passes_checks(self, w: torch.Tensor) -> bool:
        """On probe inputs (two random rows; one matching a weight row's signs at full scale, the kernel's
        largest sums), every logit lies within its bound of the float64 product, and the ids agree."""
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(3, self.hidden, generator=g)
        probe[2] = torch.sign(w[int(torch.randint(len(w), (1,), generator=g))]) * probe[:2].abs().max()
        y, err = self.approx(probe)
        rows = max(1, CHUNK_ELEMENTS // self.hidden)
        for lo in range(0, len(w), rows):
            gap = (probe.double() @ w[lo:lo + rows].double().T - y[:, lo:lo + rows].double()).abs()
            if not bool((gap <= err[:, lo:lo + rows].double()).all()):
                return False
        ids = self._screen(probe[:2], lambda h, cols: h @ w[cols].T)
        return ids is None or ids == (probe[:2] @ w.T).argmax(dim=-1).tolist()  # None: undecided, fp32 answers

    def _factors(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's logits y~ [n, vocab] and each row's bound factors F [n, 4] (E = F @ coef)."""
        c = 1e-4 + self.hidden * 2 ** -23
        size = h.norm(dim=1)
        zero = torch.zeros_like(size)
        if self.kernel == "u8":
            rest, wide = self._split(h)
            top = float(rest.abs().max())
            sx = float(torch.tensor(top / 127 if top > 0 else 1.0, dtype=torch.float32))  # exact in fp32
            k = torch.round(rest / sx).clamp_(-127, 127)
            y = onednn.u8_linear((k + onednn.U8_ZERO).to(torch.uint8), sx, self.packed, self.w_scales, self.w_zeros)
            if wide is not None:  # the outlier channels' share in fp32, from the weight's own columns
                y.addmm_(h[:, wide], self.columns(wide))
            out = torch.full_like(size, 2 ** -16 * self.hidden * 127 * sx)
            # the weight's rounding only meets the int8 channels (the others' products are exact fp32)
            return y, torch.stack([rest.norm(dim=1) + c * size, (rest - k * sx).norm(dim=1) + c * size, out, zero],
                                  dim=1)
        rough = h.to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(rough, self.q, self.scales).float()
        return y, torch.stack([(1 + c) * size, (h - rough.float()).norm(dim=1) + c * size, zero,
                               2 ** -7 * y.abs().amax(dim=1)], dim=1)

    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h`` without its outlier channels (zeroed) and those channels (None: none, or no ``columns``).
        An outlier channel reaches OUTLIER_RATIO times the step's rms value; at most MAX_OUTLIERS of
        them, the largest. Without the split one such channel sets the int8 step of every other."""
        if self.columns is None:
            return h, None
        peak = h.abs().amax(dim=0)  # [hidden]
        rms = float(h.pow(2).mean().sqrt())
        over = int((peak > OUTLIER_RATIO * rms).sum()) if rms > 0 else 0
        if not over:
            return h, None
        wide = peak.topk(min(over, MAX_OUTLIERS)).indices.sort().values
        rest = h.clone()
        rest[:, wide] = 0.0
        return rest, wide

    def takes(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows is screened (u8: any size, in chunks; bf16: up to SCREEN_ROWS)."""
        return self.kernel == "u8" or rows <= SCREEN_ROWS

    def approx(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's logits y~ [n, vocab] and each one's error bound E [n, vocab] (tests, load check)."""
        y, f = self._factors(h)
        return y, f @ self.coef

    def argmax(self, h: torch.Tensor, exact) -> list[int] | None:
        """``exact(h, cols)``: the fp32 logits [n, len(cols)] of vocabulary entries ``cols`` (ascending)."""
        if not self.on:
            return None
        ids = []
        for part in h.split(self.max_rows):
            got = self._screen(part, exact)
            if got is None:
                ids = None
                break
            ids += got
        self.calls += 1
        self.misses += ids is None
        if self.calls == MISS_WINDOW and 4 * self.misses > MISS_WINDOW:
            self.on = False
            log.warning("greedy screen off: %d of its first %d steps left too many candidates (the fp32 output "
                        "layer answers every step now)", self.misses, MISS_WINDOW)
        return ids

    def _screen(self, h: torch.Tensor, exact) -> list[int] | None:
        n = h.shape[0]
        if not bool(torch.isfinite(h).all()):
            return None
        y, f = self._factors(h)
        vocab = y.shape[1]
        nc = vocab // SPAN
        cut = nc * SPAN
        peaks = y[:, :cut].view(n, nc, SPAN).amax(dim=2)  # [n, spans]: each span's largest y~
        if cut < vocab:
            peaks = torch.cat([peaks, y[:, cut:].amax(dim=1, keepdim=True)], dim=1)
        top, wide = peaks.amax(dim=1), f @ self.coef_max  # wide >= every E in the row
        if not bool(torch.isfinite(top).all() and torch.isfinite(wide).all()):
            return None
        # spans holding an entry with y~_i >= max y~ - 2 max E (every entry the exact test keeps passes this)
        rows, spans = (peaks >= (top - 2 * wide)[:, None]).nonzero().unbind(1)
        if len(rows) > SCREEN_MAX_SPANS * n:
            return None
        cols = spans[:, None] * SPAN + torch.arange(SPAN)  # [m, SPAN]
        inside = cols < vocab
        cols = cols.clamp_(max=vocab - 1)
        val = torch.take(y, rows[:, None] * vocab + cols)
        per = self.coef_t.index_select(0, cols.view(-1)).view(len(rows), SPAN, 4)
        err = torch.bmm(per, f[rows][:, :, None]).squeeze(2)  # E of each entry: [m, SPAN]
        floor = torch.full((n,), -float("inf")).scatter_reduce(  # max_k (y~_k - E_k) per row
            0, rows, (val - err).masked_fill_(~inside, -float("inf")).amax(dim=1), "amax")
        keep = (val + err >= floor[rows][:, None]) & inside
        rows, cols = rows[:, None].expand_as(cols)[keep], cols[keep]
        if int(torch.bincount(rows, minlength=n).max()) > SCREEN_MAX_CANDIDATES:
            return None
        union = torch.unique(cols, sorted=True)
        logits = exact(h, union)  # [n, len(union)]
        if not bool(torch.isfinite(logits).all()):
            return None
        # another row's candidates need no mask: an entry a row left out is below that row's maximum
        # (y~ + E < max (y~ - E)), so the first of equal maxima over the union is the row's own
        return union[logits.argmax(dim=1)].tolist()


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
