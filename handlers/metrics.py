"""Engine and encoder metrics as plain snapshots; the Triton adapter publishes them.

The engine calls ``sink.update(snapshot)`` with cumulative counters, current gauges and the
latency observations made since the last call, so nothing here depends on Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COUNTERS = {
    "prompt_tokens": "Prompt tokens received",
    "computed_prompt_tokens": "Prompt tokens computed (prefix-cache hits are not)",
    "generation_tokens": "Tokens generated",
    "image_tokens": "Image placeholder tokens received",
    "prefix_cache_hit_tokens": "Prompt tokens served from the prefix cache",
    "prefix_cache_query_tokens": "Prompt tokens looked up in the prefix cache",
    "preemptions": "Sequences preempted (recomputed later) for lack of KV blocks",
    "requests_finished": "Requests finished (any reason)",
    "requests_rejected": "Requests refused at admission (overload or invalid)",
    "image_cache_hits": "Images whose embeddings came from the encoder cache",
    "image_cache_misses": "Images encoded",
    "video_cache_hits": "Videos whose decoded frames came from preprocess' video cache",
    "video_cache_misses": "Videos decoded",
    "grammar_cache_hits": "Structured-output requests whose grammar was compiled already (or compiling)",
    "grammar_cache_misses": "Structured-output grammars compiled (one per distinct spec while cached)",
    "grammar_compile_timeouts": "Grammar compiles that ran past grammar_compile_timeout_s (request failed)",
    "grammar_compile_errors": "Grammars that failed to compile (request failed with INVALID_ARG)",
}
GAUGES = {
    "num_requests_running": "Sequences in the running batch",
    "num_requests_waiting": "Sequences waiting for admission",
    "kv_cache_usage_ratio": "Fraction of KV cache blocks in use",
}
HISTOGRAMS = {
    "time_to_first_token_seconds": ("Time from arrival at the engine to the first token",
                                    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]),
    "time_per_output_token_seconds": ("Time between consecutive output tokens",
                                      [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5]),
    "grammar_compile_seconds": ("Time to compile one structured-output grammar (off the engine thread)",
                                [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]),
}


@dataclass
class Snapshot:
    counters: dict = field(default_factory=dict)  # cumulative values
    gauges: dict = field(default_factory=dict)
    observations: dict = field(default_factory=dict)  # histogram name -> new values


class NullSink:
    def update(self, snapshot: Snapshot) -> None:
        pass

    def info(self, name: str, description: str, labels: dict) -> None:
        pass
