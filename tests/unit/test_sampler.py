"""SeqSampler on hand-made logits, against transformers' logits processors (and OpenAI's formula for
presence/frequency penalties). Written against behaviour only (tokens out of ``__call__``): greedy
picks are compared with the reference's argmax over many random logit vectors; sampled picks by
their support (exact) and frequencies (a few thousand draws) against the reference's softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tritonvl.handlers.engine.sampler import SeqSampler
from tritonvl.handlers.sampling import SamplingParams

V = 24


def make(prompt=(), history=(), stop=(), **params) -> SeqSampler:
    s = SeqSampler(SamplingParams(**params), list(prompt), set(stop), "cpu")
    for t in history:
        s.record(t)
    return s


def hf(processors, input_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([input_ids], dtype=torch.long)
    scores = logits.clone()[None]
    for p in processors:
        scores = p(ids, scores)
    return scores[0]


def greedy_trials(build, reference, trials: int = 300) -> float:
    """Each trial: a fresh sampler with random prompt/history; its greedy pick must be the reference's
    argmax. Returns the share of trials where the processing changed the raw argmax (non-trivial)."""
    g = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(trials):
        prompt = torch.randint(0, V, (5,), generator=g).tolist()
        history = torch.randint(0, V, (6,), generator=g).tolist()
        logits = torch.randn(V, generator=g) * 2
        want = int(reference(prompt, history, logits).argmax())
        got = build(prompt, history)(logits)
        assert got == want, (prompt, history, logits)
        changed += want != int(logits.argmax())
    return changed / trials


@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    share = greedy_trials(lambda p, h: make(p, h, repetition_penalty=penalty),
                          lambda p, h, lg: hf([proc], p + h, lg))
    assert share > 0.1


def openai_penalties(history: list[int], logits: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's documented formula: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting the
    tokens generated so far (not the prompt)."""
    out = logits.clone()
    for j in range(V):
        c = history.count(j)
        out[j] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return out


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 0.8), (0.6, 0.4), (-1.0, 0.0), (0.0, -0.5)])
def test_presence_and_frequency_penalties_follow_openai_formula(presence, frequency):
    share = greedy_trials(lambda p, h: make(p, h, presence_penalty=presence, frequency_penalty=frequency),
                          lambda p, h, lg: openai_penalties(h, lg, presence, frequency))
    assert share > 0.1


def test_min_tokens_masks_stop_ids_until_reached():
    stop = [3, 7]
    prompt = [1, 2]
    logits = torch.linspace(0, 1, V)
    logits[3], logits[7] = 10.0, 9.0  # the stop ids are the top picks
    s = make(prompt, stop=stop, min_tokens=4)
    proc = MinNewTokensLengthLogitsProcessor(len(prompt), 4, stop)
    picks = []
    for _ in range(6):
        want = int(hf([proc], prompt + s.output_ids, logits).argmax())
        picks.append(s(logits))
        assert picks[-1] == want
    assert 3 not in picks[:4] and picks[4:] == [3, 3]


def test_min_tokens_masks_stop_ids_when_sampling_too():
    logits = torch.zeros(V)
    logits[5] = 4.0  # the stop id holds most of the mass
    s = make([1], stop=[5], min_tokens=300, max_tokens=400, temperature=1.0, seed=3)
    assert 5 not in [s(logits) for _ in range(300)]
    assert s(logits) == 5 or 5 in [s(logits) for _ in range(20)]


def sampled_frequencies(s: SeqSampler, logits: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.zeros(V)
    for _ in range(n):
        counts[s(logits)] += 1
    return counts / n


WARPER_CASES = [  # (params, transformers warpers in generate()'s order)
    ({"temperature": 0.7}, [TemperatureLogitsWarper(0.7)]),
    ({"temperature": 1.0, "top_k": 4}, [TopKLogitsWarper(4)]),
    ({"temperature": 1.3, "top_p": 0.6}, [TemperatureLogitsWarper(1.3), TopPLogitsWarper(0.6)]),
    ({"temperature": 1.0, "min_p": 0.2}, [MinPLogitsWarper(0.2)]),
    ({"temperature": 0.9, "top_k": 8, "top_p": 0.8, "min_p": 0.1},
     [TemperatureLogitsWarper(0.9), TopKLogitsWarper(8), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1)]),
]


@pytest.mark.parametrize("params,warpers", WARPER_CASES, ids=[str(c[0]) for c in WARPER_CASES])
def test_sampled_distribution_matches_transformers_warpers(params, warpers):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 1.5
    want = torch.softmax(hf(warpers, [0], logits), dim=-1)
    got = sampled_frequencies(make([0], seed=42, **params), logits, 4000)
    assert set(got.nonzero().flatten().tolist()) <= set(want.nonzero().flatten().tolist())  # masks exact
    assert (got - want).abs().max() < 0.03, (got, want)
    assert bool(((want > 0.05) <= (got > 0)).all())  # every likely token is drawn


def test_repetition_penalty_then_warpers_matches_transformers():
    """Penalties apply to the logits before temperature and truncation, as in generate()."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 1.5
    prompt = torch.topk(logits, 3).indices.tolist()  # penalize the likeliest tokens
    warpers = [RepetitionPenaltyLogitsProcessor(1.8), TemperatureLogitsWarper(0.8), TopKLogitsWarper(6)]
    want = torch.softmax(hf(warpers, prompt, logits), dim=-1)
    # each draw joins the history (the penalty would grow): one fresh sampler per draw
    counts = torch.zeros(V)
    for seed in range(4000):
        s = make(prompt, seed=seed, temperature=0.8, top_k=6, repetition_penalty=1.8)
        counts[s(logits)] += 1
    got = counts / counts.sum()
    assert set(got.nonzero().flatten().tolist()) <= set(want.nonzero().flatten().tolist())
    assert (got - want).abs().max() < 0.03, (got, want)


def test_seeded_sampler_repeats_itself():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    a, b = (make([0], seed=99, temperature=1.0, max_tokens=50) for _ in range(2))
    assert [a(logits) for _ in range(30)] == [b(logits) for _ in range(30)]
