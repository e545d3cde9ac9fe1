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
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import onednn

BLOCK = 4096  # vocabulary columns per block (8 MB of fp32 weight at hidden 512)
PACK_MAX_BYTES = 1 << 30  # a bigger head (7B+ in fp32) is not copied again: the blocks serve 2+ rows too


class OutputHead:
    """``logits(h)`` -> [n, vocab] float; ``argmax(h)`` -> each row's greedy id (the first of equal
    maxima, as ``torch.argmax`` over ``logits(h)``: both read the same products)."""

    def __init__(self, lm_head: nn.Module) -> None:
        self.module = lm_head
        self.vocab = lm_head.weight.shape[0]

    @classmethod
    def build(cls, lm_head: nn.Module, device, embeddings: nn.Module | None = None) -> OutputHead:
        """The blocked head on CPU for a plain bias-free float ``nn.Linear``, else the module itself.
        An untied output weight is released once blocked (``embeddings``: the input embedding, whose
        weight a tied head shares and must keep)."""
        w = getattr(lm_head, "weight", None)
        plain = (type(lm_head) is nn.Linear and lm_head.bias is None and isinstance(w, torch.Tensor)
                 and w.dtype in (torch.float32, torch.bfloat16, torch.float16) and not w.is_meta)
        if str(device).split(":")[0] != "cpu" or not plain:
            return cls(lm_head)
        tied = embeddings is not None and getattr(embeddings, "weight", None) is w
        return BlockedHead(lm_head, release=not tied)

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
    def __init__(self, lm_head: nn.Linear, release: bool = True) -> None:
        w = lm_head.weight.detach()
        self.vocab, hidden = w.shape
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
        return first_argmax(self._logits(h)).tolist()


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
