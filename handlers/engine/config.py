"""One frozen config object carries every knob of the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Knobs of the continuous-batching engine.

    ``num_blocks`` and ``max_model_len`` have no defaults: the first depends on device memory, the
    second on the model. ``max_num_batched_tokens`` is the per-step token budget: prefill-chunk tokens
    plus one per decoding sequence.
    """

    num_blocks: int
    max_model_len: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        for name in ("num_blocks", "max_model_len", "block_size", "max_num_seqs", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len < 2:
            raise ValueError("EngineConfig.max_model_len must be >= 2 (one prompt token, one output)")
        # Every running sequence decodes one token per step, so all of them must fit the budget.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        # A lone sequence of max_model_len tokens must always fit, or preemption could livelock.
        if self.max_model_len > self.num_blocks * self.block_size:
            raise ValueError(
                f"EngineConfig.max_model_len ({self.max_model_len}) exceeds the KV cache capacity "
                f"num_blocks * block_size = {self.num_blocks * self.block_size} tokens"
            )

    @property
    def max_blocks_per_seq(self) -> int:
        """Block-table width that covers a sequence of ``max_model_len`` tokens."""
        return -(-self.max_model_len // self.block_size)
