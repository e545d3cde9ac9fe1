"""The output layer (engine/output_head.py) and the fused greedy path (model_runner.StepLogits): the
CPU head re-laid in vocabulary blocks gives the module's own logits and every row's argmax, ties and
a partial last block included; batches of plain greedy rows never build the whole logits; rows with
logprobs, penalties or sampling still get them; the engine's tokens are the same either way."""

from __future__ import annotations

import os
import types

import pytest
import torch

from tritonvl.handlers.engine import model_runner as mr
from tritonvl.handlers.engine import onednn
from tritonvl.handlers.engine import output_head as oh
from tritonvl.handlers.engine.sampler import SeqSampler, sample_batch
from tritonvl.handlers.sampling import SamplingParams


def linear(vocab: int, hidden: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(hidden, vocab, bias=False)


def fake_runner(vocab: int, hidden: int, seed: int = 0):
    head = oh.OutputHead.build(linear(vocab, hidden, seed), "cpu")
    runner = types.SimpleNamespace(head=head, calls=[])
    logits, argmax = head.logits, head.argmax
    head.logits = lambda h: (runner.calls.append("full"), logits(h))[1]
    head.argmax = lambda h: (runner.calls.append("argmax"), argmax(h))[1]
    return runner


@pytest.mark.parametrize("rows", [1, 2, 7, 32])
@pytest.mark.parametrize("vocab", [3 * oh.BLOCK + 123, 2 * oh.BLOCK, oh.BLOCK - 5])  # partial tail, none, no block
def test_blocked_head_equals_the_module(rows, vocab):
    lin = linear(vocab, 64)
    h = torch.randn(rows, 64)
    with torch.inference_mode():
        want = lin(h)
        head = oh.OutputHead.build(lin, "cpu")
        assert isinstance(head, oh.BlockedHead) and head.packed is not None  # oneDNN's copy for 2+ rows
        got = head.logits(h)
        assert got.shape == (rows, vocab)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert head.argmax(h) == got.argmax(dim=-1).tolist()  # the same products, the same ids


def test_blocked_head_greedy_ids_equal_the_modules():
    lin = linear(3 * oh.BLOCK + 7, 32, seed=1)
    h = torch.randn(16, 32)
    with torch.inference_mode():
        want = lin(h).argmax(dim=-1).tolist()
        assert oh.OutputHead.build(lin, "cpu").argmax(h) == want


def test_ties_across_blocks_and_the_tail_give_the_first_index():
    lin = linear(2 * oh.BLOCK + 10, 16)
    with torch.no_grad():
        w = lin.weight
        w.mul_(0.01)
        w[oh.BLOCK + 5] = w[5] = w[2 * oh.BLOCK + 1] = 1.0  # the same maximum in two blocks and the tail
    h = torch.ones(3, 16)
    with torch.inference_mode():
        head = oh.OutputHead.build(lin, "cpu")
        assert head.argmax(h) == [5, 5, 5]
        assert head.logits(h).argmax(dim=-1).tolist() == [5, 5, 5]


def test_tail_wins_when_strictly_greater():
    lin = linear(oh.BLOCK + 10, 16)
    with torch.no_grad():
        lin.weight.mul_(0.01)
        lin.weight[oh.BLOCK + 3] = 1.0
    with torch.inference_mode():
        assert oh.OutputHead.build(lin, "cpu").argmax(torch.ones(2, 16)) == [oh.BLOCK + 3] * 2


def test_untied_weight_released_tied_kept_other_devices_untouched():
    lin = linear(oh.BLOCK + 1, 8)
    oh.OutputHead.build(lin, "cpu")
    assert lin.weight is None  # the blocks are the only copy
    emb = torch.nn.Embedding(oh.BLOCK + 1, 8)
    tied = linear(oh.BLOCK + 1, 8)
    tied.weight = emb.weight
    head = oh.OutputHead.build(tied, "cpu", emb)
    assert isinstance(head, oh.BlockedHead) and tied.weight is emb.weight
    for dev in ("cuda:0", "npu:1"):  # not built there: the module's own forward, weight untouched
        m = linear(oh.BLOCK + 1, 8)
        head = oh.OutputHead.build(m, dev)
        assert type(head) is oh.OutputHead and m.weight is not None
    biased = torch.nn.Linear(8, oh.BLOCK + 1)
    assert type(oh.OutputHead.build(biased, "cpu")) is oh.OutputHead


def test_packed_copy_only_when_it_agrees(monkeypatch):
    """oneDNN's packed head is kept only after one product agrees with the weight's; a disagreeing or
    missing op leaves the blocks serving every row count (still equal to the module)."""
    lin = linear(oh.BLOCK + 9, 16)
    real = torch.ops.mkldnn._linear_pointwise
    with torch.inference_mode():
        want = lin(torch.ones(3, 16))
    broken = types.SimpleNamespace(_reorder_linear_weight=torch.ops.mkldnn._reorder_linear_weight,
                                   _linear_pointwise=lambda *a: real(*a) + 1.0)
    monkeypatch.setattr(torch.ops, "mkldnn", broken)
    head = oh.OutputHead.build(lin, "cpu")
    assert head.packed is None
    with torch.inference_mode():
        torch.testing.assert_close(head.logits(torch.ones(3, 16)), want, rtol=1e-5, atol=1e-5)


def test_no_packed_copy_past_the_size_limit(monkeypatch):
    monkeypatch.setattr(oh, "PACK_MAX_BYTES", 1000)
    head = oh.OutputHead.build(linear(oh.BLOCK + 9, 16), "cpu")
    assert isinstance(head, oh.BlockedHead) and head.packed is None


def test_bf16_head_matches_the_module():
    lin = linear(oh.BLOCK + 50, 32).to(torch.bfloat16)
    h = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = lin(h).float()
        got = oh.OutputHead.build(lin, "cpu").logits(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def sampler(**kw) -> SeqSampler:
    params = SamplingParams(**{"temperature": 0.0, **kw})
    return SeqSampler(params, [1, 2, 3], {0}, "cpu")


def test_plain_greedy_batch_never_builds_whole_logits():
    runner = fake_runner(oh.BLOCK + 77, 32)
    h = torch.randn(4, 32)
    samplers = [sampler() for _ in range(4)]
    got = sample_batch(samplers, mr.StepLogits(runner, h))
    assert runner.calls == ["argmax"]
    with torch.inference_mode():
        assert got == runner.head.logits(h).argmax(dim=-1).tolist()
    assert [s.output_ids for s in samplers] == [[t] for t in got]


def test_a_row_that_needs_logits_gets_whole_logits_and_the_same_greedy_tokens():
    runner = fake_runner(oh.BLOCK + 77, 32)
    h = torch.randn(3, 32)
    with torch.inference_mode():
        plain = sample_batch([sampler() for _ in range(3)], mr.StepLogits(runner, h))
    runner.calls.clear()
    logprob_row = SeqSampler(SamplingParams(temperature=0.0), [1], {0}, "cpu", logprobs=2)
    mixed = [sampler(), logprob_row, sampler(repetition_penalty=1.0)]
    shapes = []
    logits = runner.head.logits
    runner.head.logits = lambda x: (shapes.append(tuple(x.shape)), logits(x))[1]
    got = sample_batch(mixed, mr.StepLogits(runner, h))
    assert runner.calls == ["argmax", "full"]  # the plain greedy rows by argmax, the logprobs row's logits alone
    assert shapes == [(1, 32)]
    assert got == plain
    assert len(logprob_row.booked_logprobs) == 1


def test_a_mixed_batch_gives_each_row_what_whole_logits_would():
    """Plain greedy rows beside sampled, penalised, logprob and failing rows: every row's token (or
    error) as from whole logits, the sampled rows' draws included (same generator seeds)."""
    runner = fake_runner(oh.BLOCK + 77, 32)
    h = torch.randn(5, 32)

    def rows():
        return [sampler(), SeqSampler(SamplingParams(temperature=0.8, seed=7), [1], {0}, "cpu"), sampler(),
                SeqSampler(SamplingParams(temperature=0.0), [1], {0}, "cpu", logprobs=1),
                SeqSampler(SamplingParams(temperature=0.0, repetition_penalty=1.3), [1, 5], {0}, "cpu")]

    with torch.inference_mode():
        whole = sample_batch(rows(), runner.head.logits(h))
    got = sample_batch(rows(), mr.StepLogits(runner, h))
    assert got == whole


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
        assert isinstance(runner.head, oh.BlockedHead)
        fused = [r.token_ids for r in pipe.generate(reqs)]
        run = runner.run
        runner.run = lambda batch: (lambda ids, lg: (ids, lg.full() if lg is not None else None))(*run(batch))
        whole = [r.token_ids for r in pipe.generate(reqs)]
    assert all(len(t) == 12 for t in fused)
    assert fused == whole


@pytest.mark.parametrize("rows,vocab", [(32, 151936), (1, 151936), (7, 3 * oh.BLOCK + 5), (5, 2 * oh.BLOCK), (3, 100)])
def test_first_argmax_equals_torch_argmax(rows, vocab):
    x = torch.randn(rows, vocab)
    assert torch.equal(oh.first_argmax(x), x.argmax(dim=-1))


def test_first_argmax_ties_and_tail():
    x = torch.zeros(4, 3 * oh.BLOCK + 9)
    x[:, 7] = x[:, oh.BLOCK + 7] = x[:, -1] = 1.0  # equal maxima in two blocks and the tail: the first wins
    assert oh.first_argmax(x).tolist() == [7] * 4
    x[:, -1] = 2.0  # the tail strictly greater
    assert oh.first_argmax(x).tolist() == [x.shape[1] - 1] * 4
    x[1, 2 * oh.BLOCK + 3] = 5.0  # one row's maximum in a later block
    assert oh.first_argmax(x).tolist() == [x.shape[1] - 1, 2 * oh.BLOCK + 3] + [x.shape[1] - 1] * 2


# ---- GreedyScreen: the int8 copy picks candidates, fp32 decides ----


KERNELS = [pytest.param("u8", marks=pytest.mark.skipif(not onednn.has_u8_gemm(), reason="no VNNI int8 GEMM here")),
           "bf16"]


def screened(vocab: int, hidden: int, kernel: str, seed: int = 0) -> tuple[torch.nn.Linear, oh.BlockedHead]:
    lin = linear(vocab, hidden, seed)
    with torch.no_grad():
        lin.weight.mul_(4.0)  # logits of a few units, as a trained head's
    ref = torch.nn.Linear(hidden, vocab, bias=False)
    ref.weight = torch.nn.Parameter(lin.weight.detach().clone())
    head = oh.OutputHead.build(lin, "cpu")
    head.screen = oh.GreedyScreen.build(ref.weight.detach(), kernels=(kernel,))
    assert head.screen is not None and head.screen.kernel == kernel
    head.screen.columns = head._columns  # as BlockedHead sets it
    return ref, head


def test_the_u8_kernel_is_preferred_where_it_runs():
    head = oh.OutputHead.build(linear(oh.BLOCK + 1, 32), "cpu")
    assert head.screen.kernel == ("u8" if onednn.has_u8_gemm() else "bf16")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 3, oh.SCREEN_ROWS, oh.SCREEN_ROWS + 1, 33, oh.U8_ROWS + 5])
def test_screened_greedy_ids_are_the_fp32_ids(kernel, rows):
    ref, head = screened(3 * oh.BLOCK + 123, 64, kernel)
    calls = []
    real = head.screen.argmax
    head.screen.argmax = lambda *a: (calls.append(1), real(*a))[1]
    with torch.inference_mode():
        for scale in (0.1, 1.0, 30.0):
            h = torch.randn(rows, 64) * scale
            assert head.argmax(h) == ref(h).argmax(dim=-1).tolist()
    # the bf16 kernel only up to SCREEN_ROWS rows (past that the fp32 GEMM); u8 at any size, in chunks
    assert len(calls) == (3 if kernel == "u8" or rows <= oh.SCREEN_ROWS else 0)
    assert head.screen.misses == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_near_ties_the_int8_copy_gets_wrong_are_decided_in_fp32(kernel):
    """Two vocabulary rows closer than int8 can tell apart (an outlier weight the input does not meet
    makes their int8 step coarse): where the int8 product ranks them the wrong way round, the screen
    still returns the fp32 argmax (its candidates come from the error bound, not its own maximum)."""
    vocab, hidden = 2 * oh.BLOCK + 40, 64
    g = torch.Generator().manual_seed(5)
    misled = 0
    for t in range(40):
        w = 0.05 * torch.randn(vocab, hidden, generator=g)
        base = torch.randn(hidden, generator=g)
        a, b = 100 + t, 2 * oh.BLOCK + 3  # one in a block, one in the tail
        w[a] = base + 0.003 * torch.randn(hidden, generator=g)
        w[b] = base + 0.003 * torch.randn(hidden, generator=g)
        w[a, 0] = w[b, 0] = 40.0
        head = oh.OutputHead.build(_with_weight(w.clone()), "cpu")
        head.screen = oh.GreedyScreen.build(w, kernels=(kernel,))
        h = (base / base.norm() ** 2)[None] * 4
        h[0, 0] = 0.0
        with torch.inference_mode():
            want = (h @ w.T).argmax(dim=-1).tolist()
            rough = head.screen.approx(h)[0]
            assert want[0] in (a, b)
            assert head.argmax(h) == want
        misled += int((rough[0] == rough.max()).sum() == 1 and rough.argmax().item() != want[0])
    assert misled >= 2  # the int8 product alone would have answered wrong that often


def _with_weight(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w)
    return lin


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_error_bound_holds_for_every_entry(kernel):
    """Every int8 logit is within its bound E of the exact (float64) one, over weight and input scales,
    outlier weights and outlier inputs; and the bound is not vacuous (the int8 product really errs by a
    good part of it)."""
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    for scale in (0.01, 0.3, 5.0):
        w = scale * torch.randn(2 * oh.BLOCK + 77, 64, generator=g)
        w[::97, 3] *= 50.0  # rows with an outlier: a coarse int8 step
        screen = oh.GreedyScreen.build(w, kernels=(kernel,))
        screen.columns = lambda ks, w=w: w[:, ks].T.contiguous()  # the head's columns (u8: outlier channels)
        for hs in (0.05, 1.0, 40.0):
            for outlier in (False, True):
                h = hs * torch.randn(3, 64, generator=g)
                if outlier:
                    h[1, 7] *= 30.0  # one big activation: a coarse int8 step for every row (u8's scale is the step's)
                y, err = screen.approx(h)
                gap = ((h.double() @ w.double().T) - y.double()).abs()
                assert bool((gap <= err.double()).all())
                worst = max(worst, float((gap / err.double()).max()))
    assert worst > 0.05


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_entry_the_bound_leaves_in_play_is_computed_again(kernel):
    """The kernel's answer made up (y~ and E given): an entry whose y~ is 1.9 E below the top can still
    be the exact maximum (its logit E above y~, the top's E below), and it is found; entries further down
    than the bound allows are never asked for."""
    vocab, hidden = 3 * oh.BLOCK + 100, 32
    screen = oh.GreedyScreen.build(linear(vocab, hidden).weight.detach(), kernels=(kernel,))
    screen.coef = torch.zeros(4, vocab)
    screen.coef[3] = 1.0  # E_i = F[r, 3] for every entry
    screen.coef_t, screen.coef_max = screen.coef.T.contiguous(), screen.coef.amax(dim=1)
    g = torch.Generator().manual_seed(3)
    e = torch.tensor([0.5, 2.0])
    y = torch.rand(2, vocab, generator=g) * 0.1  # everything far below the top (>= 3E)
    top, target = torch.tensor([[17, 5000], [2 * oh.BLOCK + 9, 3 * oh.BLOCK + 77]]).unbind(1)
    rows = torch.arange(2)
    y[rows, top] = 10.0
    y[rows, target] = 10.0 - 1.9 * e
    exact_table = y - e[:, None]
    exact_table[rows, target] = y[rows, target] + e  # within its bound, above the top's exact logit
    f = torch.zeros(2, 4)
    f[:, 3] = e
    screen._factors = lambda h: (y.clone(), f)
    asked = []

    def exact(h, cols):
        asked.append(cols)
        assert bool((y[:, cols] >= 10.0 - 2 * e[:, None]).any(dim=0).all())  # only entries in play
        return exact_table[:, cols]

    assert screen.argmax(torch.ones(2, hidden), exact) == target.tolist()
    assert len(asked) == 1


@pytest.mark.skipif(not onednn.has_u8_gemm(), reason="no VNNI int8 GEMM here")
def test_outlier_channels_go_around_the_u8_kernel():
    """Hidden states with a few channels far above the rest (as LLMs' are): one int8 step for the whole
    row would be set by them and leave the bound too wide to decide; those channels are multiplied in
    fp32 from the head's own columns instead, and the screen decides with the fp32 ids."""
    ref, head = screened(3 * oh.BLOCK + 123, 64, "u8")
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 64, generator=g)
    h[:, [5, 40]] *= 80.0  # two outlier channels
    with torch.inference_mode():
        want = ref(h).argmax(dim=-1).tolist()
        assert head.argmax(h) == want
        assert head.screen.misses == 0
        assert head.screen._split(h)[1].tolist() == [5, 40]
        columns, head.screen.columns = head.screen.columns, None  # without the split: undecided, fp32 answers
        assert head.screen.argmax(h, head._exact) is None
        head.screen.columns = columns
        _, err = head.screen.approx(h)
        head.screen.columns = None
        _, err_unsplit = head.screen.approx(h)
    assert float(err.mean()) * 10 < float(err_unsplit.mean())


@pytest.mark.parametrize("kernel", KERNELS)
def test_screen_falls_back_to_fp32_when_it_cannot_decide(kernel):
    """Every row equal (all entries candidates: past SCREEN_MAX_CANDIDATES) and a non-finite input:
    the whole fp32 product answers, the first of equal maxima as torch.argmax."""
    vocab, hidden = oh.BLOCK + 100, 32
    w = torch.randn(hidden).repeat(vocab, 1)
    head = oh.OutputHead.build(_with_weight(w.clone()), "cpu")
    head.screen = oh.GreedyScreen.build(w, kernels=(kernel,))
    assert head.screen is not None
    with torch.inference_mode():
        h = torch.randn(2, hidden)
        assert head.screen.argmax(h, lambda *a: pytest.fail("no candidates expected")) is None
        assert head.argmax(h) == [0, 0]
        bad = torch.full((1, hidden), float("nan"))
        assert head.screen.argmax(bad, lambda *a: pytest.fail("no candidates expected")) is None


def test_a_screen_that_rarely_decides_turns_itself_off():
    """More than a quarter of its first MISS_WINDOW calls undecided: off (the fp32 product answers
    without the wasted int8 pass); a quarter or fewer: it stays on."""
    vocab, hidden = oh.BLOCK + 100, 32
    w = torch.randn(hidden).repeat(vocab, 1)  # every entry equal: every call undecided
    w[0] += 1.0
    head = oh.OutputHead.build(_with_weight(w.clone()), "cpu")
    easy = torch.randn(1, hidden)
    easy = easy - easy.mean() + 1.0  # entry 0 wins by a clear margin (its logit is hidden more)
    hard = torch.randn(1, hidden)
    hard -= hard.mean()  # orthogonal to w[0] - w[1] (all ones): every entry's logit the same
    with torch.inference_mode():
        decided = sum(head.screen.argmax(easy * 100, head._exact) is not None for _ in range(48))
        assert decided == 48
        for _ in range(16):
            assert head.screen.argmax(hard, head._exact) is None
        assert head.screen.on  # 16 of 64
        head.screen.calls = head.screen.misses = 0
        for _ in range(oh.MISS_WINDOW):
            head.screen.argmax(hard, head._exact)
        assert not head.screen.on
        assert head.screen.argmax(easy * 100, lambda *a: pytest.fail("off")) is None
        assert head.argmax(easy * 100) == (easy * 100 @ w.T).argmax(dim=-1).tolist()


def test_screen_only_where_it_applies(monkeypatch):
    assert oh.OutputHead.build(linear(oh.BLOCK + 1, 32).to(torch.bfloat16), "cpu").screen is None
    assert oh.OutputHead.build(linear(oh.BLOCK + 1, 32), "cpu", screen=False).screen is None
    w = linear(oh.BLOCK + 1, 24).weight.detach()
    assert oh.GreedyScreen.build(w, kernels=("bf16",)) is None  # hidden not a multiple of 16
    assert (oh.GreedyScreen.build(w, kernels=("u8",)) is not None) == onednn.has_u8_gemm()
    w = linear(oh.BLOCK + 1, 32).weight.detach()
    real = torch._weight_int8pack_mm  # a kernel that disagrees with the product is not used
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda h, q, s: -real(h, q, s))
    assert oh.GreedyScreen.build(w, kernels=("bf16",)) is None
    # nor one that keeps every argmax (a 5% scale error) but leaves the bound: checked at load
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda h, q, s: real(h, q, s) * 1.05)
    assert oh.GreedyScreen.build(w, kernels=("bf16",)) is None
    monkeypatch.setattr(torch, "_weight_int8pack_mm", real)
    assert oh.GreedyScreen.build(w, kernels=("bf16",)) is not None


@pytest.mark.skipif(not onednn.has_u8_gemm(), reason="no VNNI int8 GEMM here")
def test_a_u8_kernel_that_breaks_the_bound_is_refused(monkeypatch):
    """The u8 kernel goes through the same load checks: off by 5%, or summing with saturation (as AVX2's
    int16 pair sums can), it is not used and the bf16 kernel screens instead."""
    w = linear(oh.BLOCK + 1, 32).weight.detach()
    real = onednn.u8_linear
    monkeypatch.setattr(onednn, "u8_linear", lambda *a: real(*a) * 1.05)
    assert oh.GreedyScreen.build(w).kernel == "bf16"

    def saturating(u, scale, packed, w_scales, w_zeros):  # the int sums clipped as int16 pairs would clip them
        y = real(u, scale, packed, w_scales, w_zeros)
        return y.clamp(-2 ** 15 * scale * float(w_scales.max()), 2 ** 15 * scale * float(w_scales.max()))

    monkeypatch.setattr(onednn, "u8_linear", saturating)
    assert oh.GreedyScreen.build(w).kernel == "bf16"
    monkeypatch.setattr(onednn, "u8_linear", real)
    assert oh.GreedyScreen.build(w).kernel == "u8"


@pytest.mark.skipif(not onednn.has_u8_gemm(), reason="no VNNI int8 GEMM here")
def test_onednn_held_to_avx2_saturates_and_the_load_check_refuses_it():
    """The real thing, not a simulation: oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA) sums u8 x s8
    products in saturating int16 pairs; the load check's probes land outside the bound, and the bf16
    kernel screens instead. Unlimited, the u8 kernel is used."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from tritonvl.handlers.engine import output_head as oh\n"
            "print(oh.GreedyScreen.build(torch.randn(20000, 64) * 0.05).kernel)\n")
    for isa, want in (("AVX2", "bf16"), ("", "u8")):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == want, (isa, out.stdout)


def test_bf16_at_least_rounds_up():
    x = torch.rand(10000) * torch.logspace(-30, 30, 10000)
    b = oh._bf16_at_least(x)
    assert b.dtype == torch.bfloat16 and bool((b.float() >= x).all())
    below = (b.view(torch.int16) - 1).view(torch.bfloat16).float()
    assert bool((below < x).all())  # the smallest such bfloat16
