"""Per-sequence grammar state and the batched token mask of one step.

A ``SeqGrammar`` belongs to the sequence (not to its KV blocks), so it survives preemption by
recompute and prefix-cache hits unchanged: it has seen exactly the tokens the sequence generated.
``GrammarMasker.apply`` fills one bitmask for all constrained rows of the step in one call and
sets every disallowed logit of those rows to -inf; the other rows are not touched.
"""

from __future__ import annotations

import torch


class SeqGrammar:
    """The matcher of one constrained sequence, advanced with each token it accepts.

    ``stop_ids`` are the sequence's end tokens: the grammar allows them exactly when the answer is
    complete (and nothing else once it can only end).
    """

    def __init__(self, compiled, stop_ids: list[int]) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids) or None)

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False when the grammar refuses it (the mask was not applied)."""
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """An end token was accepted: the answer is complete."""
        return bool(self.matcher.is_terminated())

    @property
    def completed(self) -> bool:
        """The text so far is a complete sentence of the grammar (an end token is allowed now)."""
        return bool(self.matcher.is_completed())


class GrammarMasker:
    """One reusable bitmask buffer ([rows, ceil(vocab / 32)] int32) for the whole batch."""

    def __init__(self, vocab_size: int, threads: int | str = "auto") -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    @torch.inference_mode()  # the runner's logits are inference tensors: in-place writes need the mode
    def apply(self, logits: torch.Tensor, rows: list[int], grammars: list[SeqGrammar]) -> torch.Tensor:
        """Mask ``logits`` ([batch, vocab], any float dtype, any device) at ``rows``; return the masked
        tensor: ``logits`` itself, or a contiguous copy of it when it was a transposed view (the runner's
        CPU GEMM form): xgrammar's kernels need unit stride over the vocabulary, and one copy of the
        whole batch is cheaper than gathering and scattering strided rows."""
        if not rows:
            return logits
        n = logits.shape[0]
        if self._bitmask.shape[0] < n:
            self._bitmask = self._xgr.allocate_token_bitmask(max(n, 2 * self._bitmask.shape[0]), self.vocab_size)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        bitmask = self._bitmask[:n]
        self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask, indices=rows)
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
        return logits
