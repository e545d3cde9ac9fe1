"""The engine's counters and latency observations, and their hand-over to the metrics sink."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tritonvl.handlers.engine.block_manager import BlockManager
from tritonvl.handlers.engine.scheduler import ScheduledBatch, Scheduler
from tritonvl.handlers.metrics import Snapshot

COUNTERS = ("prompt_tokens", "computed_prompt_tokens", "generation_tokens", "image_tokens", "requests_finished",
            "requests_rejected")


@dataclass
class SeqTimes:
    """When one sequence arrived and produced its first and latest token (time.monotonic())."""

    arrived: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None


class EngineStats:
    """Counts what the engine does; ``publish`` sends a Snapshot (with the scheduler's and the block
    manager's own figures) every step while busy, twice a second when idle."""

    def __init__(self, sink, scheduler: Scheduler, blocks: BlockManager) -> None:
        self.sink, self.scheduler, self.blocks = sink, scheduler, blocks
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._ttft: list[float] = []
        self._tpot: list[float] = []
        self._published = 0.0
        self.grammar = None  # engine.grammar.compiler.GrammarStats once structured outputs are in use

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def scheduled(self, batch: ScheduledBatch) -> None:
        self.counters["computed_prompt_tokens"] += sum(e.num_new_tokens for e in batch if not e.is_decode)

    def token(self, times: SeqTimes, now: float) -> None:
        """One generated token of a sequence: TTFT for its first, TPOT for the later ones."""
        self.counters["generation_tokens"] += 1
        if times.first_token is None:
            times.first_token = now
            self._ttft.append(now - times.arrived)
        else:
            self._tpot.append(now - times.last_token)
        times.last_token = now

    def publish(self, queued: int, force: bool = False) -> None:
        """``queued``: jobs handed in but not admitted yet (they count as waiting)."""
        now = time.monotonic()
        if not force and now - self._published < 0.5:
            return
        self._published = now
        blocks, sched = self.blocks, self.scheduler
        counters = {**self.counters, "prefix_cache_hit_tokens": blocks.prefix_hits_tokens,
                    "prefix_cache_query_tokens": blocks.prefix_queries_tokens,
                    "preemptions": sched.num_preemptions}
        gauges = {"num_requests_running": sched.num_running, "num_requests_waiting": sched.num_waiting + queued,
                  "kv_cache_usage_ratio": blocks.usage}
        observations = {"time_to_first_token_seconds": self._ttft, "time_per_output_token_seconds": self._tpot}
        if self.grammar is not None:
            counters |= self.grammar.counters()
            observations["grammar_compile_seconds"] = self.grammar.drain_times()
        self._ttft, self._tpot = [], []
        self.sink.update(Snapshot(counters, gauges, observations))
