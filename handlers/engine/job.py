"""One generation job as every llm backend sees it: the step's inputs, the request's options, and where
its output records go. ``check`` refuses, with INVALID_ARG naming the field, anything a step would
index with a request's values: the llm model is callable directly, so its inputs are not trusted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.engine.outputs import Emit, Responder
from tritonvl.handlers.modelinfo import ModelInfo
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

    def check(self, info: ModelInfo) -> None:
        """The inputs against the model (every backend calls it at admission, before the job can reach a
        step shared with other requests)."""
        ids, embeds, grid = self.input_ids, self.visual_embeds, self.grid_thw
        if ids.ndim != 1 or not ids.size:
            raise InvalidArgument(f"input_ids: expected a non-empty list of token ids, got shape {list(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= info.vocab_size:
            bad = low if low < 0 else high
            raise InvalidArgument(f"input_ids: token id {bad} is outside the vocabulary [0, {info.vocab_size})")
        placeholders = int(np.isin(ids, (info.image_token_id, info.video_token_id)).sum())
        width = info.embed_width
        if embeds.ndim != 2 or (embeds.shape[0] and embeds.shape[1] != width):
            raise InvalidArgument(f"image_embeds: expected [rows, {width}], got {list(embeds.shape)}")
        if embeds.shape[0] != placeholders:
            raise InvalidArgument(f"image_embeds: {embeds.shape[0]} rows for the {placeholders} image/video "
                                  "placeholder tokens of input_ids")
        if grid.size and ((grid < 1).any() or (np.prod(grid, axis=1) % info.merge_unit).any()):
            raise InvalidArgument(f"image_grid_thw: each row's t, h, w must be positive and t*h*w a multiple of "
                                  f"{info.merge_unit}")
        if int((np.prod(grid, axis=1) // info.merge_unit).sum()) != placeholders:
            raise InvalidArgument(f"image_grid_thw: {len(grid)} images/videos whose tokens do not add up to the "
                                  f"{placeholders} placeholder tokens of input_ids")
        if embeds.size and not np.isfinite(embeds).all():
            raise InvalidArgument("image_embeds: not all finite")
        self.options.check(info.vocab_size, len(grid))

    @classmethod
    def create(cls, input_ids: np.ndarray, visual_embeds: np.ndarray, grid_thw: np.ndarray,
               media_hashes, request_json: str | bytes, emit: Emit, emit_error: Callable[[Exception], None],
               is_cancelled: Callable[[], bool] = lambda: False) -> Job:
        """A job from the llm step's inputs (batch dim removed) and its options' JSON."""
        options = RequestOptions.from_json(request_json)  # InvalidArgument when it is not the step's JSON
        responder = Responder(options, int(input_ids.shape[0]), emit, emit_error, int(visual_embeds.shape[0]))
        grid_thw = np.asarray(grid_thw)
        if grid_thw.size % 3:
            raise InvalidArgument(f"image_grid_thw: expected [images, 3], got shape {list(grid_thw.shape)}")
        return cls(np.asarray(input_ids).astype(np.int64), np.ascontiguousarray(visual_embeds, dtype=np.float32),
                   grid_thw.astype(np.int64).reshape(-1, 3), [bytes(h) for h in media_hashes],
                   options, responder, is_cancelled)
