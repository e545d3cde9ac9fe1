"""Booked logprobs (llm.sampler) -> the ``logprobs`` output: one JSON object per generated token.

``{"token": text, "token_id": id, "logprob": x, "top_logprobs": [{"token", "token_id", "logprob"}, ...]}``,
the alternatives most likely first. Log-probabilities are of the raw model logits (before penalties,
temperature and grammar masks: vLLM's default). A token's text is its own decode (a byte-level piece
of a multi-byte character shows as U+FFFD).
"""

from __future__ import annotations

import json


def entries(tokenizer, booked: list[tuple[int, float, list[tuple[int, float]]]]) -> list[str]:
    """JSON strings, one per booked token."""
    def one(token: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([token]), "token_id": token, "logprob": logprob}

    return [json.dumps({**one(token, lp), "top_logprobs": [one(t, v) for t, v in top]})
            for token, lp, top in booked]
