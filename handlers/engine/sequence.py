"""One request as the engine sees it: token ids, KV progress and its block table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

_arrival_counter = itertools.count()
_seq_id_counter = itertools.count()

#: (start, length, content_hash) of one image's placeholder tokens inside the prompt.
MMSpan = tuple[int, int, bytes]


def stop_ids_for(stop_token_ids, ignore_eos: bool, eos_ids) -> frozenset[int]:
    """The tokens that end a sequence: the request's stop_token_ids and, unless ignore_eos, the model's eos."""
    return frozenset(stop_token_ids) | (frozenset() if ignore_eos else frozenset(eos_ids))


def token_ending(token: int, num_generated: int, stop_ids, min_tokens: int, max_tokens: int) -> str | None:
    """Whether the newest token ends its sequence: "stop" (a stop id past min_tokens; its text is not
    shown), "length" (max_tokens reached), else None. The one rule every backend applies; stop strings
    are the detokenizer's (engine.textstream), a complete grammar ends it in the engine."""
    if num_generated > min_tokens and token in stop_ids:
        return "stop"
    return "length" if num_generated >= max_tokens else None


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    """A prompt and the tokens generated after it.

    ``token_ids`` holds prompt then generated tokens. ``num_computed_tokens`` counts the leading
    tokens whose KV is in the cache; the rest are computed by later steps (chunked prefill, decode, or
    recompute after preemption). ``mm_hashes`` lists the image placeholder spans of the prompt, keyed
    by image content hash, so that prefix caching tells two images apart. ``payload`` is opaque to the
    scheduler: the model runner keeps image embeddings, rope deltas and sampling params there.
    """

    token_ids: list[int]
    max_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_id_counter))
    mm_hashes: list[MMSpan] = field(default_factory=list)
    payload: Any = None
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of the leading full, computed blocks; owned by the BlockManager.
    block_hashes: list[bytes] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # stop_ids_for(): tokens that end it (after min_tokens)
    min_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    # Monotonic admission stamp: FCFS order and the preemption victim (newest first).
    arrival: int = field(default_factory=lambda: next(_arrival_counter))

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        if self.num_prompt_tokens == 0:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for start, length, content_hash in self.mm_hashes:
            if start < 0 or length < 1 or start + length > self.num_prompt_tokens:
                raise ValueError(f"image span ({start}, {length}) lies outside the prompt")
            if not isinstance(content_hash, bytes):
                raise TypeError("image content hash must be bytes")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model; 1 means the sequence is decoding."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill_done(self) -> bool:
        """True once only the newest token lacks KV, i.e. the next step is a decode step."""
        return self.num_uncomputed_tokens <= 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        """Blocks that hold KV for all ``num_tokens`` tokens."""
        return -(-len(self.token_ids) // block_size)

    def ending(self, max_model_len: int) -> str | None:
        """Whether the token just appended ends the sequence (token_ending), or the context is full."""
        reason = token_ending(self.last_token, self.num_generated, self.stop_ids, self.min_tokens, self.max_tokens)
        return "length" if reason is None and self.num_tokens >= max_model_len else reason

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
