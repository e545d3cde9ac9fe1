"""BlockManager: paged allocation, ref counts and prefix caching keyed by image content."""

import pytest

from tritonvl.handlers.engine.block_manager import BlockManager, hash_block
from tritonvl.handlers.engine.config import EngineConfig
from tritonvl.handlers.engine.sequence import Sequence

BS = 4
IMG = 151655  # placeholder id: the same for every image
A, B = b"image-a" * 4, b"image-b" * 4


def seq(tokens, mm=()) -> Sequence:
    return Sequence(list(tokens), max_tokens=8, mm_hashes=list(mm))


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Pretend the runner computed every token of ``s`` and book it."""
    bm.allocate(s)
    s.num_computed_tokens = s.num_tokens
    bm.cache_computed(s)
    return s


def test_allocate_free_refcounts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    s = seq(range(10))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.deallocate(s)
    assert s.block_table == [] and s.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_can_allocate_counts_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=BS)
    assert bm.can_allocate(seq(range(12)))
    assert not bm.can_allocate(seq(range(13)))
    bm.allocate(seq(range(5)))
    with pytest.raises(RuntimeError):
        bm.allocate(seq(range(12)))


@pytest.mark.parametrize(
    "prompt_b, cached",
    [
        (list(range(10)), 8),  # same prompt: both full blocks
        (list(range(8)) + [99, 98], 8),  # shares two blocks, differs after
        (list(range(6)) + [99, 98, 97, 96], 4),  # differs inside block 1
        ([99] + list(range(1, 10)), 0),  # differs in block 0: chain breaks at once
        (list(range(9)), 8),
        (list(range(8)), 4),  # block 1 holds the last prompt token: never served from cache
        (list(range(4)), 0),
        (list(range(3)), 0),  # no full block
    ],
)
def test_prefix_hits(prompt_b, cached):
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = computed(bm, seq(range(10)))
    b = seq(prompt_b)
    bm.allocate(b)
    assert b.num_computed_tokens == cached
    assert b.num_computed_tokens < b.num_tokens
    n = cached // BS
    assert b.block_table[:n] == a.block_table[:n]
    assert set(b.block_table[n:]).isdisjoint(a.block_table)
    assert all(bm.blocks[x].ref_count == 2 for x in b.block_table[:n])
    assert bm.prefix_hits_tokens == cached
    assert bm.prefix_queries_tokens == 10 + len(prompt_b)


def test_uncomputed_blocks_are_not_shared():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq(range(10))
    bm.allocate(a)
    a.num_computed_tokens = 4  # first chunk only
    bm.cache_computed(a)
    b = seq(range(10))
    bm.allocate(b)
    assert b.num_computed_tokens == 4


# Prompt: 2 text tokens, 8 image placeholders at positions 2..9, 2 text tokens -> blocks 0..2.
IMG_PROMPT = [1, 2] + [IMG] * 8 + [3, 4]


@pytest.mark.parametrize(
    "mm_a, mm_b, cached",
    [
        ([(2, 8, A)], [(2, 8, A)], 8),  # same image: share (last block holds the last token)
        ([(2, 8, A)], [(2, 8, B)], 0),  # different images, identical token ids: nothing shared
        ([(2, 8, A)], [], 0),  # image vs. no image key
        ([(2, 8, A)], [(3, 7, A)], 0),  # same image placed differently
    ],
)
def test_image_content_keys_blocks(mm_a, mm_b, cached):
    bm = BlockManager(num_blocks=16, block_size=BS)
    computed(bm, seq(IMG_PROMPT, mm_a))
    b = seq(IMG_PROMPT, mm_b)
    bm.allocate(b)
    assert b.num_computed_tokens == cached


def test_image_in_later_block_shares_text_prefix_only():
    prompt = list(range(8)) + [IMG] * 4 + [5, 6]
    bm = BlockManager(num_blocks=16, block_size=BS)
    computed(bm, seq(prompt, [(8, 4, A)]))
    b = seq(prompt, [(8, 4, B)])
    bm.allocate(b)
    assert b.num_computed_tokens == 8


def test_hash_block_chains_and_keys_image_offset():
    h0 = hash_block(None, [IMG] * 4, 0, [(0, 8, A)])
    assert h0 == hash_block(None, [IMG] * 4, 0, [(0, 8, A)])
    assert h0 != hash_block(None, [IMG] * 4, 0, [(0, 8, B)])
    # Block 1 of the same image differs from block 0 (image offset), and the chain matters.
    assert hash_block(h0, [IMG] * 4, 4, [(0, 8, A)]) != hash_block(h0, [IMG] * 4, 4, [(0, 4, A), (4, 4, A)])
    assert hash_block(h0, [1, 2, 3, 4], 4, []) != hash_block(None, [1, 2, 3, 4], 4, [])


def test_cached_blocks_survive_free_until_reused():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = computed(bm, seq(range(10)))
    bm.deallocate(a)
    assert bm.num_free_blocks == 6
    # Unhashed free blocks go first: the cached prefix survives this allocation.
    bm.allocate(seq(range(100, 112)))
    b = seq(range(10))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_computed_tokens == 8
    assert bm.num_free_blocks == 0


def test_cached_blocks_evicted_when_reused():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = computed(bm, seq(range(10)))
    bm.deallocate(a)
    filler = seq(range(100, 116))  # needs all 4 blocks: evicts the cached ones
    bm.allocate(filler)
    bm.deallocate(filler)
    b = seq(range(10))
    bm.allocate(b)
    assert b.num_computed_tokens == 0


def test_decode_crosses_block_boundaries_and_hashes_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    s = seq(range(4))
    bm.allocate(s)
    s.num_computed_tokens = 4
    bm.cache_computed(s)
    assert len(s.block_hashes) == 1
    for step in range(9):
        s.append_token(1000 + step)  # sampled token: needs a KV slot in the next step
        assert bm.can_append(s)
        grows = s.num_tokens % BS == 1
        before = len(s.block_table)
        bm.may_append(s)
        assert len(s.block_table) == before + grows
        assert len(s.block_table) * BS >= s.num_tokens
        s.num_computed_tokens += 1
        bm.cache_computed(s)
        assert len(s.block_hashes) == s.num_computed_tokens // BS
    # The decoded full blocks are shared by a prompt that repeats them.
    t = seq(s.token_ids + [7])
    bm.allocate(t)
    assert t.num_computed_tokens == 12


def test_can_append_false_when_full():
    bm = BlockManager(num_blocks=1, block_size=BS)
    s = seq(range(4))
    bm.allocate(s)
    s.append_token(5)
    assert not bm.can_append(s)


def test_prefix_caching_disabled():
    bm = BlockManager.from_config(
        EngineConfig(
            num_blocks=16, max_model_len=64, block_size=BS, max_num_seqs=4, enable_prefix_caching=False
        )
    )
    computed(bm, seq(range(10)))
    b = seq(range(10))
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and bm.prefix_queries_tokens == 0
