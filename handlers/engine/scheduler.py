"""Continuous batching: which sequences compute how many tokens in the next step.

Each step runs the decoding sequences first (one token each), then prefill chunks of partially
prefilled and newly admitted sequences within the token budget. When a decode needs a block and none
is free, the newest running sequences are preempted by recompute.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from tritonvl.handlers.engine.block_manager import BlockManager
from tritonvl.handlers.engine.config import EngineConfig
from tritonvl.handlers.engine.sequence import Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_waiting`` sequences; the request should be rejected."""


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: tokens ``start .. start + num_new_tokens`` of ``seq``.

    ``sample`` is True when the chunk reaches the sequence's last token: only then is the logit of
    the chunk's last position sampled.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool

    @property
    def token_ids(self) -> list[int]:
        """Token ids to feed; valid until ``postprocess`` appends the sampled token."""
        return self.seq.token_ids[self.start : self.start + self.num_new_tokens]

    @property
    def is_decode(self) -> bool:
        return self.sample and self.num_new_tokens == 1 and self.start >= self.seq.num_prompt_tokens


@dataclass
class ScheduledBatch:
    """The entries of one step, decodes first, then prefill chunks."""

    entries: list[ScheduledSeq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ScheduledSeq]:
        return iter(self.entries)


class Scheduler:
    """Waiting and running queues over one BlockManager; single-threaded (the engine thread)."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()  # FCFS; preempted sequences go back to the front
        self.running: list[Sequence] = []  # sorted by arrival: the tail is the preemption victim
        self._seqs: dict[int, Sequence] = {}
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; QueueFullError when the queue is full, ValueError for a bad sequence."""
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens leaves no room to generate within "
                f"max_model_len={self.config.max_model_len}"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} sequences)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._seqs[seq.seq_id] = seq

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work; blocks for every scheduled token are allocated on return."""
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        preempted = False

        for seq in list(self.running):  # oldest first; victims come from the newest end
            if seq.status is not SequenceStatus.RUNNING or not seq.is_prefill_done:
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.may_append(seq)
                decodes.append(ScheduledSeq(seq, seq.num_computed_tokens, 1, True))
                budget -= 1

        for seq in self.running:  # partially prefilled sequences already hold all their blocks
            if budget == 0:
                break
            if not seq.is_prefill_done:
                prefills.append(self._chunk(seq, budget))
                budget -= prefills[-1].num_new_tokens

        # After a preemption memory is short: admitting now would only thrash.
        while not preempted and budget > 0 and self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            prefills.append(self._chunk(seq, budget))
            budget -= prefills[-1].num_new_tokens

        return ScheduledBatch(decodes + prefills)

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Book a computed step; ``sampled`` maps seq_id to its token for every ``sample`` entry.

        Returns the sequences that got a new token, in batch order. A sequence whose new token is one
        of its stop ids (past min_tokens) is finished here with reason "stop", one reaching
        ``max_tokens`` or ``max_model_len`` with "length" (``Sequence.ending``); stop strings and
        grammars are the caller's, through ``finish``.
        """
        out: list[Sequence] = []
        for entry in batch:
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted after schedule()
                continue
            seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.cache_computed(seq)
            if not entry.sample:
                continue
            seq.append_token(sampled[seq.seq_id])
            out.append(seq)
            reason = seq.ending(self.config.max_model_len)
            if reason is not None:
                self.finish(seq.seq_id, reason)
        return out

    def finish(self, seq_id: int, reason: str = "stop") -> Sequence | None:
        """Drop a sequence and free its blocks at once; None when it is unknown or already done."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancel a waiting or running sequence (finish reason "abort")."""
        return self.finish(seq_id, "abort")

    def _chunk(self, seq: Sequence, budget: int) -> ScheduledSeq:
        n = min(seq.num_uncomputed_tokens, budget)
        return ScheduledSeq(seq, seq.num_computed_tokens, n, seq.num_computed_tokens + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        # Generated tokens stay in token_ids: readmission recomputes prompt + generated.
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
