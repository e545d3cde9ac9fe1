"""What one request asks of the llm step (sampling and response options), carried as JSON between steps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from tritonvl.client.rules.errors import InvalidArgument, RequestError
from tritonvl.client.rules.sampling import MAX_TOP_LOGPROBS
from tritonvl.client.rules.structured import KINDS, MAX_SPEC_CHARS
from tritonvl.handlers.sampling import SamplingParams, build_sampling_params


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
        """The JSON preprocess writes, every value type- and range-checked again (the llm model is callable
        directly): anything else is INVALID_ARG naming the problem."""
        try:
            d = json.loads(text)
            sampling = dict(d["sampling"])
            spec = _spec(sampling.pop("structured_outputs", None))
            params = build_sampling_params(sampling, None, vocab_size=2**31)  # the vocabulary: check()
            params.structured_outputs = spec
            flags = [d["stream"], d["exclude_input_in_output"], d.get("clamp_max_tokens", True)]
            logprobs, times = d.get("logprobs", -1), d.get("second_per_grid_ts", [])
            if not all(isinstance(f, bool) for f in flags) or not isinstance(d["prompt_text"], str):
                raise InvalidArgument("request: stream, exclude_input_in_output, clamp_max_tokens must be booleans "
                                      "and prompt_text a string")
            if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not -1 <= logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidArgument(f"request: logprobs={logprobs!r}: must be between -1 and {MAX_TOP_LOGPROBS}")
            if not isinstance(times, list) or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1e6 for t in times):
                raise InvalidArgument("request: second_per_grid_ts must be a list of positive numbers")
        except RequestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise InvalidArgument(f"request: not the llm step's options JSON ({type(exc).__name__}: {exc})") from None
        return cls(params, flags[0], flags[1], d["prompt_text"], flags[2], logprobs, [float(t) for t in times])

    def check(self, vocab_size: int, media_items: int) -> None:
        """What needs the model: token ids in its vocabulary, at most one time step per image/video."""
        self.sampling.validate(vocab_size)
        if len(self.second_per_grid_ts) > media_items:
            raise InvalidArgument(f"request: {len(self.second_per_grid_ts)} second_per_grid_ts values for "
                                  f"{media_items} images and videos")


def _spec(value) -> dict | None:
    """A structured-output constraint as the options carry it (GrammarSpec.to_dict()), checked."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("kind") not in KINDS or not isinstance(value.get("text", ""), str) \
            or len(value.get("text", "")) > MAX_SPEC_CHARS:
        raise InvalidArgument(f"request: structured_outputs must be {{kind: one of {list(KINDS)}, text}}")
    return {"kind": value["kind"], "text": value.get("text", "")}


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
