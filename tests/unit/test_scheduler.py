"""Scheduler: chunked prefill, budgets, preemption by recompute, abort, bounded queue."""

import random

import pytest

from tritonvl.handlers.engine.block_manager import BlockManager
from tritonvl.handlers.engine.config import EngineConfig
from tritonvl.handlers.engine.scheduler import QueueFullError, Scheduler
from tritonvl.handlers.engine.sequence import Sequence, SequenceStatus


def make(**kw) -> Scheduler:
    cfg = EngineConfig(
        **{
            "num_blocks": 64,
            "max_model_len": 128,
            "block_size": 4,
            "max_num_seqs": 4,
            "max_num_batched_tokens": 16,
            **kw,
        }
    )
    return Scheduler(cfg, BlockManager.from_config(cfg))


def fake_token(seq: Sequence) -> int:
    """Depends only on (sequence, position), so recompute after preemption yields the same text."""
    return (seq.seq_id * 7919 + seq.num_tokens * 31) % 50000


def step(s: Scheduler):
    batch = s.schedule()
    return batch, s.postprocess(batch, {e.seq.seq_id: fake_token(e.seq) for e in batch if e.sample})


@pytest.mark.parametrize(
    "kw",
    [
        {"num_blocks": 0, "max_model_len": 8},
        {"num_blocks": 4, "max_model_len": 1},
        {"num_blocks": 4, "max_model_len": 8, "block_size": 0},
        {"num_blocks": 4, "max_model_len": 65},  # more than 4 * 16 tokens of KV
        {"num_blocks": 4, "max_model_len": 8, "max_num_seqs": 8, "max_num_batched_tokens": 4},
        {"num_blocks": 4, "max_model_len": 8, "max_waiting": 0},
    ],
)
def test_config_rejects_nonsense(kw):
    with pytest.raises(ValueError):
        EngineConfig(**kw)


def test_chunked_prefill_then_decode():
    s = make(max_num_batched_tokens=8)
    seq = Sequence(list(range(20)), max_tokens=3)
    s.add(seq)
    chunks = []
    while s.has_work():
        batch, got = step(s)
        (e,) = batch.entries
        chunks.append((e.start, e.num_new_tokens, e.sample))
        assert bool(got) == e.sample
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True), (21, 1, True)]
    assert seq.num_generated == 3 and seq.finish_reason == "length"
    assert s.block_manager.num_free_blocks == 64


def test_budget_and_max_num_seqs():
    s = make(max_num_seqs=2, max_num_batched_tokens=10)
    seqs = [Sequence([i] * 6, max_tokens=4) for i in range(5)]
    for q in seqs:
        s.add(q)
    batch, _ = step(s)
    assert [(e.seq, e.num_new_tokens) for e in batch] == [(seqs[0], 6), (seqs[1], 4)]
    assert s.num_running == 2 and s.num_waiting == 3
    batch, _ = step(s)  # decode of seq 0 first, then the rest of seq 1's prompt
    assert [(e.seq, e.num_new_tokens, e.sample) for e in batch] == [(seqs[0], 1, True), (seqs[1], 2, True)]
    assert batch.num_tokens == 3 and batch.entries[0].is_decode


def test_preemption_recomputes_newest():
    s = make(
        num_blocks=4, max_model_len=16, max_num_seqs=2, max_num_batched_tokens=16, enable_prefix_caching=False
    )
    old, new = Sequence(list(range(8)), max_tokens=8), Sequence(list(range(50, 58)), max_tokens=8)
    s.add(old)
    s.add(new)
    step(s)  # both prefilled: 4 blocks used, one token each
    assert s.block_manager.num_free_blocks == 0
    batch, _ = step(s)  # both need a 3rd block: the newer one is preempted
    assert [e.seq for e in batch] == [old]
    assert s.num_preemptions == 1 and s.waiting[0] is new
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_generated == 1  # kept: recompute covers prompt + generated


def test_abort_frees_blocks_at_once():
    s = make()
    running, waiting = Sequence(list(range(10)), max_tokens=4), Sequence(list(range(10)), max_tokens=4)
    s.add(running)
    step(s)
    s.add(waiting)
    assert s.block_manager.num_free_blocks < 64
    assert s.abort(running.seq_id) is running and running.finish_reason == "abort"
    assert s.block_manager.num_free_blocks == 64
    assert s.abort(waiting.seq_id) is waiting and s.abort(waiting.seq_id) is None
    assert not s.has_work()


def test_abort_between_schedule_and_postprocess():
    s = make()
    q = Sequence(list(range(10)), max_tokens=4)
    s.add(q)
    batch = s.schedule()
    s.abort(q.seq_id)
    assert s.postprocess(batch, {q.seq_id: 1}) == [] and q.num_generated == 0


def test_queue_full_and_bad_requests():
    s = make(max_waiting=2)
    s.add(Sequence([1, 2], max_tokens=1))
    s.add(Sequence([1, 2], max_tokens=1))
    with pytest.raises(QueueFullError):
        s.add(Sequence([1, 2], max_tokens=1))
    with pytest.raises(ValueError):
        make().add(Sequence(list(range(128)), max_tokens=1))  # no room to generate


def test_max_model_len_safety_net():
    s = make(max_model_len=12)
    q = Sequence(list(range(10)), max_tokens=100)
    s.add(q)
    while s.has_work():
        step(s)
    assert q.num_tokens == 12 and q.finish_reason == "length"


def test_caller_finish_stops_sequence():
    s = make()
    q = Sequence(list(range(5)), max_tokens=100)
    s.add(q)
    _, got = step(s)
    assert got == [q]
    assert s.finish(q.seq_id) is q and q.finish_reason == "stop" and not s.has_work()


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_simulated_serving_loop_under_memory_pressure(seed, prefix_caching):
    rng = random.Random(seed)
    s = make(
        num_blocks=24,
        max_model_len=96,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        enable_prefix_caching=prefix_caching,
    )
    shared = [rng.randrange(1000) for _ in range(12)]  # a common system prompt
    seqs = []
    for _ in range(12):
        prompt = shared + [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
        seqs.append(Sequence(prompt, max_tokens=rng.randrange(1, 40)))
        s.add(seqs[-1])
    expected = {q.seq_id: q.num_prompt_tokens for q in seqs}

    for _ in range(2000):
        if not s.has_work():
            break
        batch = s.schedule()
        bm, cfg = s.block_manager, s.config
        assert 0 < batch.num_tokens <= cfg.max_num_batched_tokens and len(batch) <= cfg.max_num_seqs
        assert len({e.seq.seq_id for e in batch}) == len(batch)
        for e in batch:
            assert e.start == e.seq.num_computed_tokens
            assert len(e.seq.block_table) * cfg.block_size >= e.start + e.num_new_tokens
        refs = {}
        for q in s.running:
            for b in q.block_table:
                refs[b] = refs.get(b, 0) + 1
        assert all(bm.blocks[b].ref_count == n for b, n in refs.items())
        assert bm.num_free_blocks == cfg.num_blocks - len(refs)
        s.postprocess(batch, {e.seq.seq_id: fake_token(e.seq) for e in batch if e.sample})
    assert not s.has_work()

    assert s.num_preemptions > 0
    assert s.block_manager.num_free_blocks == 24
    for q in seqs:
        assert q.num_generated == q.max_tokens and q.finish_reason == "length"
        # Every token is the one sampled at its position: none lost or duplicated by recompute.
        p = expected[q.seq_id]
        assert q.generated_ids == [(q.seq_id * 7919 + n * 31) % 50000 for n in range(p, q.num_tokens)]
    if prefix_caching:
        assert s.block_manager.prefix_hits_tokens > 0


@pytest.mark.parametrize("min_tokens, expected", [(0, (1, "stop")), (1, (2, "stop")), (5, (5, "length"))])
def test_post_step_ends_on_a_stop_id_after_min_tokens(min_tokens, expected):
    """The scheduler's post-step is where a stop id ends a sequence (not before min_tokens)."""
    s = make()
    seq = Sequence(list(range(6)), max_tokens=5, stop_ids=frozenset({99}), min_tokens=min_tokens)
    s.add(seq)
    while s.has_work():
        batch = s.schedule()
        s.postprocess(batch, {e.seq.seq_id: 99 for e in batch if e.sample})  # always the stop id
    assert (seq.num_generated, seq.finish_reason) == expected
