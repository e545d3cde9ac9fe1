"""The compiled decode step (llm parameter compile=decode, handlers/engine/compiled.py) on the tiny
model, in process: greedy tokens identical to the eager engine and to transformers' generate() at
batch 1 and at a batch padded up to its bucket (text and image rows); every compiled step's output
compared with the eager forward of the same step; a perturbed compiled step is caught.

Compiling is slow on a CPU (inductor writes and builds C++): buckets 1 and 4 only; about 15 s with
a warm inductor cache (/tmp/torchinductor_$USER), 1-3 min on a fresh machine.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import Reference, make_image
from tritonvl.handlers.preprocess.preprocessor import RawRequest
from tritonvl.handlers.tools.offline import OfflinePipeline

MAX = 10
BUCKETS = (1, 4)
PROMPTS = ["Tell me a story about a lighthouse.", "What is in the picture?", "Count to ten.",
           "Describe the sea at night."]


def request(i: int, image: bool) -> RawRequest:
    return RawRequest(text_input=PROMPTS[i].encode(), images=[make_image(120 + 16 * i, 90, seed=i)] if image else [],
                      sampling={"max_tokens": MAX, "ignore_eos": True, "temperature": 0.0})


def batch3() -> list[RawRequest]:  # three in flight: decode steps of 3 rows padded to the bucket of 4
    return [request(0, False), request(1, True), request(2, False)]


@pytest.fixture(scope="module")
def eager(model_dir):
    with OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24) as pipe:
        yield {"b1_text": [r.token_ids for r in pipe.generate([request(0, False)])],
               "b1_image": [r.token_ids for r in pipe.generate([request(1, True)])],
               "b3": [r.token_ids for r in pipe.generate(batch3())]}


@pytest.fixture(scope="module")
def compiled(model_dir, eager):
    with OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24, compile="decode", compile_buckets=BUCKETS) as pipe:
        step = pipe.engine.runner.compiled
        assert step is not None and step.buckets == list(BUCKETS) and step.compile_s > 0
        yield pipe


def test_batch_1_text_and_image_equal_eager_and_generate(compiled, eager, model_dir):
    step = compiled.engine.runner.compiled
    before = step.steps
    text = [r.token_ids for r in compiled.generate([request(0, False)])]
    image = [r.token_ids for r in compiled.generate([request(1, True)])]
    assert step.steps - before >= 2 * (MAX - 1)  # every decode step ran compiled
    assert step.fallbacks == 0
    assert text == eager["b1_text"] and image == eager["b1_image"]
    ref = Reference(str(model_dir))
    assert text[0] == ref.generate(PROMPTS[0], max_tokens=MAX)
    assert image[0] == ref.generate(PROMPTS[1], [make_image(120 + 16, 90, seed=1)], max_tokens=MAX)


def test_padded_batch_equals_eager(compiled, eager):
    """Decode steps of 3 rows run in the bucket of 4; the KV cache changes only at the real rows' slots."""
    runner = compiled.engine.runner
    step = runner.compiled
    seen, stray = [], []
    forward = step.forward

    def watched(s):
        before = runner.kv_cache.clone()
        out = forward(s)
        if out is not None:
            seen.append(len(s.parts))
            bs = runner.block_size
            real = {p.block_table[p.start // bs] * bs + p.start % bs for p in s.parts}
            changed = set((runner.kv_cache != before).any(dim=(0, 1, 3, 4)).nonzero().flatten().tolist())
            stray.extend(changed - real)
        return out

    step.forward = watched
    try:
        got = [r.token_ids for r in compiled.generate(batch3())]
    finally:
        del step.forward
    assert 3 in seen and step.bucket(3) == 4  # decode steps of 3 rows went through the bucket of 4
    assert not stray  # padded rows wrote nothing
    assert got == eager["b3"]
    assert all(len(t) == MAX for t in got)


def compare_steps(pipe, requests) -> list[tuple[int, float, bool]]:
    """Run ``requests``; for every decode step the compiled path takes, run the eager forward of the
    same step too (after it: the eager K/V, bitwise the eager engine's, is what later steps read)
    and record (rows, max |hidden difference|, argmax of the logits equal)."""
    runner = pipe.engine.runner
    step = runner.compiled
    forward = runner.forward
    out = []

    def both(s):
        hidden_c = step.forward(s)
        if hidden_c is None:
            return forward(s)
        runner.compiled = None
        try:
            hidden_e = forward(s)
        finally:
            runner.compiled = step
        same = torch.equal(runner.head.logits(hidden_c).argmax(-1), runner.head.logits(hidden_e).argmax(-1))
        out.append((len(s.parts), float((hidden_c - hidden_e).abs().max()), same))
        return hidden_e

    runner.forward = both
    try:
        pipe.generate(requests)
    finally:
        del runner.forward
    return out


def test_every_compiled_step_gives_the_eager_argmax(compiled):
    steps = compare_steps(compiled, batch3() + [request(3, True)])
    assert {rows for rows, _, _ in steps} >= {4}  # four in flight
    assert all(same for _, _, same in steps), steps


def test_a_perturbed_compiled_step_is_caught(compiled):
    """The check above is not vacuous: a compiled step whose output is off fails it."""
    step = compiled.engine.runner.compiled
    real = step._compiled
    step._compiled = lambda tokens, positions: real(tokens, positions).roll(1, dims=-1)
    try:
        steps = compare_steps(compiled, [request(0, False)])
    finally:
        step._compiled = real
    assert steps and not all(same for _, _, same in steps)


def test_an_engine_built_later_in_the_process_leaves_the_compiled_one_compiled(compiled, model_dir):
    """Transformers' attention registry is process-wide: each engine's function has a name of its own
    (attention/registry.py), so an eager engine built after the compiled one does not replace the
    function the compiled graph guards on (with one shared name, every step fell back to eager)."""
    step = compiled.engine.runner.compiled
    with OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24) as later:
        before, fallbacks = step.steps, step.fallbacks
        got = [r.token_ids for r in compiled.generate([request(0, False)])]
        assert step.fallbacks == fallbacks and step.steps - before >= MAX - 1
        assert got == [r.token_ids for r in later.generate([request(0, False)])]
        assert later.engine.runner.lm.config._attn_implementation != compiled.engine.runner.lm.config._attn_implementation


def test_static_buffer_path_gives_the_eager_argmax(compiled):
    """(Last in this module: its warm-up writes K/V into block 0 of the live cache, which may hold a
    cached prefix of an earlier request; at load, where the engine warms up, the cache is empty.)
    The CUDA-graph path's static buffers (slot mapping, block tables, lengths; padded rows repeat
    row 0's K/V write and have length 0) run on the CPU without capture, with a torch stand-in for
    the paged decode kernel: every step's argmax equals the eager step's. (Per step, not whole
    sequences: the stand-in attends over every block of the table, masked, so its sums differ from
    eager SDPA's in the last bits and the tiny random model's near-ties can drift apart over a
    sequence; the capture itself needs a GPU: untested.)"""
    from tritonvl.handlers.engine.compiled import CompiledStep

    runner = compiled.engine.runner
    cuda_less = CompiledStep(runner, list(BUCKETS), compiled.engine.config.max_model_len, static=True)
    cuda_less.warm_up()
    assert cuda_less.static and not cuda_less.cuda_graphs
    before, runner.compiled = runner.compiled, cuda_less
    try:
        steps = compare_steps(compiled, batch3()) + compare_steps(compiled, [request(1, True)])
    finally:
        runner.compiled = before
    assert {rows for rows, _, _ in steps} >= {1, 3} and cuda_less.fallbacks == 0  # 3: padded to 4
    assert all(same for _, _, same in steps), steps
    assert max(diff for _, diff, _ in steps) < 1e-3


def test_compiled_decoder_keeps_onednn_linears_unfused(compiled):
    """compile=decode keeps the packed oneDNN linears (in the graph as tritonvl::onednn_linear), one per
    layer: the fused q/k/v and gate/up products share an input through Python state dynamo cannot trace."""
    from tritonvl.handlers.engine import onednn

    mods = list(compiled.engine.runner.lm.modules())
    assert any(isinstance(m, onednn.PackedLinear) for m in mods)
    assert not any(isinstance(m, onednn.FusedMember) for m in mods)
    assert not any(type(m) is torch.nn.Linear for m in compiled.engine.runner.lm.layers.modules())
