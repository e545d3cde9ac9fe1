"""What one request asks of the llm step (sampling and response options), carried as JSON between steps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.sampling import SamplingParams


@dataclass
class RequestOptions:
    sampling: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    prompt_text: str = ""
    # the llm step may cut max_tokens to the room its own max_model_len leaves (the request set none,
    # or preprocess parameter clamp_max_tokens); else more than fits is INVALID_ARG with the numbers
    clamp_max_tokens: bool = True
    # -1: no logprobs output; k >= 0: each token's logprob and its k most likely alternatives
    logprobs: int = -1
    # Qwen2.5-VL: seconds per temporal patch of each video, in prompt order (its mRoPE time positions)
    second_per_grid_ts: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"sampling": asdict(self.sampling), "stream": self.stream,
                           "exclude_input_in_output": self.exclude_input_in_output,
                           "prompt_text": self.prompt_text, "clamp_max_tokens": self.clamp_max_tokens,
                           "logprobs": self.logprobs, "second_per_grid_ts": self.second_per_grid_ts})

    @classmethod
    def from_json(cls, text: str | bytes) -> RequestOptions:
        d = json.loads(text)
        return cls(SamplingParams(**d["sampling"]), d["stream"], d["exclude_input_in_output"], d["prompt_text"],
                   d.get("clamp_max_tokens", True), d.get("logprobs", -1), d.get("second_per_grid_ts", []))


def fit_to_context(prompt_tokens: int, sampling: SamplingParams, max_model_len: int, may_cut: bool,
                   how_to_cut: str = "") -> None:
    """The one rule for "does it fit max_model_len": the prompt must leave room to generate, and a
    max_tokens past that room is INVALID_ARG naming the numbers (vLLM's rule) unless ``may_cut`` (the
    request set none, or the deployment cuts: clamp_max_tokens), then it is cut; min_tokens follows.
    Preprocess applies it before the vision step runs; the llm's engine again with its own
    max_model_len, and once more with its KV cache's capacity (which only cuts)."""
    if prompt_tokens >= max_model_len:
        raise InvalidArgument(f"prompt: {prompt_tokens} tokens does not fit max_model_len={max_model_len} "
                              "(with room to generate)")
    room = max_model_len - prompt_tokens
    if sampling.max_tokens > room and not may_cut:
        raise InvalidArgument(f"max_tokens={sampling.max_tokens} does not fit: the prompt has {prompt_tokens} tokens "
                              f"and max_model_len is {max_model_len}, so at most {room}{how_to_cut}")
    sampling.max_tokens = min(sampling.max_tokens, room)
    sampling.min_tokens = min(sampling.min_tokens, sampling.max_tokens)
