"""Paged KV-cache accounting with prefix caching by chained block hashes.

Only full blocks whose KV has been computed are hashed and shared. A block's hash covers the hash of
the block before it, its token ids, and, for every image placeholder span it overlaps, where the
overlap lies and the image's content hash: placeholder token ids are the same for every image, so the
content hash is what keeps two images from sharing KV.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from tritonvl.handlers.engine.config import EngineConfig
from tritonvl.handlers.engine.sequence import MMSpan, Sequence


def hash_block(prev_hash: bytes | None, token_ids: list[int], start: int, mm_spans: list[MMSpan]) -> bytes:
    """Chained hash of the block holding ``token_ids`` at positions ``start ..``."""
    h = hashlib.blake2b(prev_hash or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    end = start + len(token_ids)
    for span_start, span_len, content_hash in mm_spans:
        lo, hi = max(span_start, start), min(span_start + span_len, end)
        if lo < hi:
            # Overlap offset in the block, its length, its offset in the image, then the image itself.
            h.update(struct.pack("<qqqq", lo - start, hi - lo, lo - span_start, len(content_hash)))
            h.update(content_hash)
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set only while hash_to_block maps this hash to this block


class BlockManager:
    """Allocates KV blocks to sequences and shares cached full blocks between them.

    Free blocks live in two pools: never-hashed ones, handed out first, and freed-but-hashed ones in
    LRU order, which keep their cached prefix until they are handed out again.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_hits_tokens = 0
        self.prefix_queries_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> BlockManager:
        return cls(config.num_blocks, config.block_size, config.enable_prefix_caching)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- prefill ---------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether ``allocate(seq)`` would find enough blocks now."""
        hits = self._match_prefix(seq)
        new = seq.num_blocks_needed(self.block_size) - len(hits)
        # A hit on a free cached block takes it out of the free pool too.
        revived = sum(1 for bid, _ in hits if self.blocks[bid].ref_count == 0)
        return new + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached prefix blocks.

        Sets ``seq.num_computed_tokens`` to the cached prefix length, which always leaves at least the
        last token to compute so the step yields logits.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._match_prefix(seq)
        for bid, block_hash in hits:  # claim hits before taking new blocks: those may evict cache
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._cached_free[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(block_hash)
        for _ in range(seq.num_blocks_needed(self.block_size) - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_queries_tokens += seq.num_tokens
            self.prefix_hits_tokens += seq.num_computed_tokens

    # -- decode ----------------------------------------------------------------------------------

    def can_append(self, seq: Sequence) -> bool:
        """Whether the blocks for ``seq``'s uncomputed tokens can be had now."""
        return self._missing_blocks(seq) <= self.num_free_blocks

    def may_append(self, seq: Sequence) -> None:
        """Grow ``seq``'s block table to cover all its tokens (a new block past a block boundary)."""
        for _ in range(self._missing_blocks(seq)):
            seq.block_table.append(self._take_free_block())

    def cache_computed(self, seq: Sequence) -> None:
        """Hash and publish the full blocks of ``seq`` whose KV has now been computed.

        Called after each step: a block is shared only once its KV is really in the cache.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block(prev, seq.token_ids[i * bs : (i + 1) * bs], i * bs, seq.mm_hashes)
            seq.block_hashes.append(block_hash)
            # Another sequence may have computed the same block first; keep that one published.
            if block_hash not in self._hash_to_block:
                block = self.blocks[seq.block_table[i]]
                self._hash_to_block[block_hash] = block.block_id
                block.hash = block_hash

    # -- release ---------------------------------------------------------------------------------

    def deallocate(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks and reset its KV progress to zero."""
        # Tail blocks first, so a prefix's tail is evicted before its head.
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._cached_free[bid] = None
                else:
                    self._free.append(bid)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    # -- internals -------------------------------------------------------------------------------

    def _match_prefix(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """(block_id, hash) of the longest cached chain of full blocks, short of the last token."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[tuple[int, bytes]] = []
        prev: bytes | None = None
        for i in range((seq.num_tokens - 1) // bs):
            prev = hash_block(prev, seq.token_ids[i * bs : (i + 1) * bs], i * bs, seq.mm_hashes)
            bid = self._hash_to_block.get(prev)
            if bid is None:
                break
            hits.append((bid, prev))
        return hits

    def _missing_blocks(self, seq: Sequence) -> int:
        return max(0, seq.num_blocks_needed(self.block_size) - len(seq.block_table))

    def _take_free_block(self) -> int:
        if self._free:
            bid = self._free.popleft()
        elif self._cached_free:
            bid, _ = self._cached_free.popitem(last=False)  # least recently freed
            block = self.blocks[bid]
            del self._hash_to_block[block.hash]  # type: ignore[arg-type]
            block.hash = None
        else:
            raise RuntimeError("out of KV blocks; check can_allocate/can_append first")
        self.blocks[bid].ref_count = 1
        return bid
