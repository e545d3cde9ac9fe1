"""What a request returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Usage:
    """Token counts as the server reports them.

    ``image_tokens``: the image (and video) placeholder tokens of the prompt (counted inside ``input_tokens``);
    None from servers without a ``num_image_tokens`` output. ``images`` / ``videos``: how many were sent.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    images: int = 0
    image_tokens: int | None = None
    videos: int = 0

    @property
    def total_tokens(self) -> int | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens


@dataclass
class Result:
    """One finished generation.

    ``finish_reason``: "stop" (eos, a stop id or a stop string), "length" (max_tokens),
    "cancelled", or "error". ``latency``: seconds from sending to the last response. ``ttft``:
    seconds to the first non-empty text delta (streaming only; None otherwise).
    """

    text: str
    finish_reason: str | None
    output_ids: list[int] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    latency: float = 0.0
    ttft: float | None = None
    # the stop string or token id the client's parser found in the output (None when the server's own
    # stop left no trace in it, e.g. a stop string it already cut)
    stop: str | int | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (usage included, total_tokens added)."""
        d = asdict(self)
        d["usage"]["total_tokens"] = self.usage.total_tokens
        return d
