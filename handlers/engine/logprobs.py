"""Booked logprobs (engine.sampler) -> one entry per generated token (the ``logprobs`` output's JSON objects).

``{"token": text, "token_id": id, "logprob": x, "top_logprobs": [{"token", "token_id", "logprob"}, ...]}``,
the alternatives most likely first. Log-probabilities are of the raw model logits (before penalties,
temperature and grammar masks: vLLM's default). A token's text is its own decode (a byte-level piece
of a multi-byte character shows as U+FFFD).
"""

from __future__ import annotations


def entries(tokenizer, booked: list[tuple[int, float, list[tuple[int, float]]]]) -> list[dict]:
    """One entry per booked token."""
    def one(token: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([token]), "token_id": token, "logprob": logprob}

    return [{**one(token, lp), "top_logprobs": [one(t, v) for t, v in top]} for token, lp, top in booked]
