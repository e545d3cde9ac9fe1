"""Pick the next token of each sequence from its logits, with that sequence's own parameters.

Penalties, then temperature / top-k / top-p / min-p, then a draw from the sequence's own
``torch.Generator`` (so a seeded request gives the same tokens whatever else is in the batch).
"""

from __future__ import annotations

import torch

from tritonvl.handlers.sampling import SamplingParams


class SeqSampler:
    """Sampling state of one sequence (its generator and the counts penalties need)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: set[int], device,
                 grammar=None, logprobs: int = -1) -> None:
        self.params = params
        self.grammar = grammar  # grammar.matcher.SeqGrammar of a structured-output request, else None
        # -1: off; k >= 0: book each chosen token's logprob and the k most likely (sample_batch)
        self.logprobs = logprobs
        self.booked_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.prompt_ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        self.output_ids: list[int] = []
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None
                                       else int(torch.randint(0, 2**62, ()).item()))

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: the engine can take it for many sequences in one call."""
        p = self.params
        return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and not (p.min_tokens and len(self.output_ids) < p.min_tokens))

    def record(self, token: int) -> None:
        """Book a token chosen outside (batched argmax)."""
        self.output_ids.append(token)

    def __call__(self, logits: torch.Tensor) -> int:
        """``logits``: [vocab] float. Returns the chosen token id (and remembers it)."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or \
                (p.min_tokens and len(self.output_ids) < p.min_tokens):
            logits = logits.clone()
        if p.repetition_penalty != 1.0:
            seen = torch.cat([self.prompt_ids, self._out_tensor(logits.device)]).unique()
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = self._out_tensor(logits.device)
            if out.numel():
                counts = torch.bincount(out, minlength=logits.numel()).to(logits.dtype)
                logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.min_tokens and len(self.output_ids) < p.min_tokens and self.stop_ids.numel():
            kept = logits[self.stop_ids]
            logits[self.stop_ids] = -float("inf")
            if self.grammar is not None and torch.isneginf(logits).all():
                logits[self.stop_ids] = kept  # the grammar can only end here: it wins over min_tokens
        token = int(torch.argmax(logits).item()) if p.greedy else self._draw(logits)
        self.output_ids.append(token)
        return token

    def _out_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.output_ids, dtype=torch.long, device=device)

    def _draw(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def sample_batch(samplers: list[SeqSampler], logits: torch.Tensor | None, masker=None) -> list[int | Exception]:
    """Row i of ``logits`` [n, vocab] (a tensor or model_runner.StepLogits) with ``samplers[i]``: the rows
    that are plain greedy without logprobs or grammar take the StepLogits' argmax (never their whole
    logits), the others get whole logits of their own rows only; from a tensor, one argmax call for every
    plain-greedy row, the others with their own parameters. A row whose sampling raises gets the exception instead of a
    token (its parameters broke sampling: the caller fails that sequence alone).

    Rows with a grammar (structured outputs) are masked first, all in one ``masker.apply``
    (grammar.matcher.GrammarMasker), and their matchers advance with the token; other rows are untouched."""
    if hasattr(logits, "argmax") and hasattr(logits, "full"):  # model_runner.StepLogits
        plain = [i for i, s in enumerate(samplers) if s.plain_greedy and s.logprobs < 0 and s.grammar is None]
        if len(plain) == len(samplers):  # every row plain greedy: the runner's argmax, no [n, vocab] logits
            tokens = logits.argmax()
            for s, token in zip(samplers, tokens):
                s.record(token)
            return tokens
        if plain:  # plain greedy rows by the runner's argmax, whole logits for the others only
            chosen = set(plain)
            others = [i for i in range(len(samplers)) if i not in chosen]
            out = [None] * len(samplers)
            for i, token in zip(plain, logits.rows(plain).argmax()):
                samplers[i].record(token)
                out[i] = token
            for i, token in zip(others, sample_batch([samplers[i] for i in others], logits.rows(others), masker)):
                out[i] = token
            return out
        logits = logits.full()
    out: list[int | Exception | None] = [None] * len(samplers)
    wants = [i for i, s in enumerate(samplers) if s.logprobs >= 0]
    # vLLM's default: log-probabilities of the raw logits, before grammar masks, penalties, temperature
    raw = torch.log_softmax(logits[wants].float(), dim=-1) if wants else None  # [len(wants), vocab]
    constrained = [i for i, s in enumerate(samplers) if s.grammar is not None]
    if constrained:
        try:
            logits = masker.apply(logits, constrained, [samplers[i].grammar for i in constrained])
        except Exception as exc:  # noqa: BLE001 - the constrained rows fail, the others go on
            for i in constrained:
                out[i] = exc
    greedy = [i for i, s in enumerate(samplers) if s.plain_greedy and out[i] is None]
    if greedy:
        for i, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
            samplers[i].record(token)
            out[i] = token
    for i, s in enumerate(samplers):
        if out[i] is None:
            try:
                out[i] = s(logits[i])
            except Exception as exc:  # noqa: BLE001 - reported per row
                out[i] = exc
    for i in constrained:
        if not isinstance(out[i], Exception) and not samplers[i].grammar.accept(out[i]):
            out[i] = RuntimeError(f"structured output: token {out[i]} is outside the grammar")
    if wants:
        _book_logprobs([samplers[i] for i in wants], [out[i] for i in wants], raw)
    return out


def _book_logprobs(samplers: list[SeqSampler], tokens: list, raw: torch.Tensor) -> None:
    """Append (token, its logprob, [(alternative, logprob)] by rank) to each row's sampler: one gather and
    one topk for every row that asked (``raw``: [rows, vocab] log-probabilities)."""
    ok = [j for j, t in enumerate(tokens) if not isinstance(t, Exception)]
    if not ok:
        return
    rows = raw[ok]
    chosen = rows.gather(1, torch.tensor([[tokens[j]] for j in ok], device=rows.device)).squeeze(1).tolist()
    k = max(samplers[j].logprobs for j in ok)
    top_v, top_i = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for n, j in enumerate(ok):
        want = samplers[j].logprobs
        samplers[j].booked_logprobs.append((tokens[j], chosen[n], list(zip(top_i[n][:want], top_v[n][:want]))))
