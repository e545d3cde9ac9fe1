"""The fused greedy output layer (model_runner.StepLogits / ModelRunner._argmax): every row's argmax
without the [n, vocab] logits, token-identical to the whole-logits path, ties included; batches of
plain greedy rows take it, rows with logprobs, penalties or sampling still get whole logits."""

from __future__ import annotations

import types

import pytest
import torch

from tritonvl.handlers.engine import model_runner as mr
from tritonvl.handlers.engine.sampler import SeqSampler, sample_batch
from tritonvl.handlers.sampling import SamplingParams


def fake_runner(vocab: int, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    runner = types.SimpleNamespace(lm_head=lm_head, calls=[])
    runner._logits = lambda h: (runner.calls.append("full"), mr.ModelRunner._logits(runner, h))[1]
    runner._argmax = lambda h: (runner.calls.append("argmax"), mr.ModelRunner._argmax(runner, h))[1]
    return runner


@pytest.mark.parametrize("rows", [1, 2, 7, 32])
def test_chunked_argmax_equals_whole_logits(rows):
    vocab = 3 * mr.ARGMAX_CHUNK + 123  # a partial last chunk
    runner = fake_runner(vocab, 64)
    h = torch.randn(rows, 64)
    with torch.inference_mode():
        want = mr.ModelRunner._logits(runner, h).argmax(dim=-1).tolist()
        assert mr.ModelRunner._argmax(runner, h) == want


def test_ties_across_chunks_give_the_first_index():
    vocab = 2 * mr.ARGMAX_CHUNK + 10
    runner = fake_runner(vocab, 16)
    with torch.no_grad():
        w = runner.lm_head.weight
        w.mul_(0.01)
        w[5] = w[mr.ARGMAX_CHUNK + 5] = w[2 * mr.ARGMAX_CHUNK + 1] = 1.0  # the same maximum in three chunks
    h = torch.ones(3, 16)
    with torch.inference_mode():
        assert mr.ModelRunner._argmax(runner, h) == [5, 5, 5]
        assert mr.ModelRunner._logits(runner, h).argmax(dim=-1).tolist() == [5, 5, 5]


def sampler(**kw) -> SeqSampler:
    params = SamplingParams(**{"temperature": 0.0, **kw})
    return SeqSampler(params, [1, 2, 3], {0}, "cpu")


def test_plain_greedy_batch_never_builds_whole_logits():
    runner = fake_runner(mr.ARGMAX_CHUNK + 77, 32)
    h = torch.randn(4, 32)
    samplers = [sampler() for _ in range(4)]
    got = sample_batch(samplers, mr.StepLogits(runner, h))
    assert runner.calls == ["argmax"]
    with torch.inference_mode():
        assert got == mr.ModelRunner._logits(runner, h).argmax(dim=-1).tolist()
    assert [s.output_ids for s in samplers] == [[t] for t in got]


def test_a_row_that_needs_logits_gets_whole_logits_and_the_same_greedy_tokens():
    runner = fake_runner(mr.ARGMAX_CHUNK + 77, 32)
    h = torch.randn(3, 32)
    with torch.inference_mode():
        plain = sample_batch([sampler() for _ in range(3)], mr.StepLogits(runner, h))
    runner.calls.clear()
    logprob_row = SeqSampler(SamplingParams(temperature=0.0), [1], {0}, "cpu", logprobs=2)
    mixed = [sampler(), logprob_row, sampler(repetition_penalty=1.0)]
    got = sample_batch(mixed, mr.StepLogits(runner, h))
    assert runner.calls == ["full"]
    assert got == plain
    assert len(logprob_row.booked_logprobs) == 1


def test_engine_output_identical_with_and_without_the_fused_layer(model_dir):
    """Greedy requests in flight together (batch > 1 every decode step), the engine as it is against
    the engine forced to whole logits: the same tokens."""
    from tests.helpers import make_image
    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    reqs = [RawRequest(text_input=f"Request {i}: tell me more.".encode(),
                       images=[make_image(120 + 8 * i, 90, i)] if i % 2 else [],
                       sampling={"max_tokens": 12, "ignore_eos": True, "temperature": 0.0}) for i in range(6)]
    with OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24) as pipe:
        runner = pipe.engine.runner
        fused = [r.token_ids for r in pipe.generate(reqs)]
        run = runner.run
        runner.run = lambda batch: (lambda ids, lg: (ids, lg.full() if lg is not None else None))(*run(batch))
        whole = [r.token_ids for r in pipe.generate(reqs)]
    assert all(len(t) == 12 for t in fused)
    assert fused == whole
