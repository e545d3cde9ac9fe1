"""One generation job as every llm backend sees it: the step's inputs, the request's options, and where
its output records go."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tritonvl.handlers.engine.outputs import Emit, Responder
from tritonvl.handlers.options import RequestOptions


@dataclass
class Job:
    input_ids: np.ndarray  # int32 [L]
    visual_embeds: np.ndarray  # float32 [visual tokens, hidden]: image and video rows in prompt order
    grid_thw: np.ndarray  # int64 [images + videos, 3]
    media_hashes: list[bytes]  # content key of each image / video, in the same order
    options: RequestOptions
    responder: Responder
    is_cancelled: Callable[[], bool] = lambda: False

    @classmethod
    def create(cls, input_ids: np.ndarray, visual_embeds: np.ndarray, grid_thw: np.ndarray,
               media_hashes, request_json: str | bytes, emit: Emit, emit_error: Callable[[Exception], None],
               is_cancelled: Callable[[], bool] = lambda: False) -> Job:
        """A job from the llm step's inputs (batch dim removed) and its options' JSON."""
        options = RequestOptions.from_json(request_json)
        responder = Responder(options, int(input_ids.shape[0]), emit, emit_error, int(visual_embeds.shape[0]))
        return cls(input_ids.astype(np.int32), np.ascontiguousarray(visual_embeds, dtype=np.float32),
                   grid_thw.astype(np.int64).reshape(-1, 3), [bytes(h) for h in media_hashes],
                   options, responder, is_cancelled)
