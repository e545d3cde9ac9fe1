"""One generation job as every llm backend sees it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tritonvl.handlers.llm.responder import Responder
from tritonvl.handlers.options import RequestOptions


@dataclass
class Job:
    input_ids: np.ndarray  # int32 [L]
    image_embeds: np.ndarray  # float32 [image tokens, hidden]
    image_grid_thw: np.ndarray  # int64 [images, 3]
    image_hashes: list[bytes]
    options: RequestOptions
    responder: Responder
    is_cancelled: Callable[[], bool] = lambda: False


def job_from_tensors(input_ids: np.ndarray, image_embeds: np.ndarray, image_grid_thw: np.ndarray,
                     image_hashes: np.ndarray | list[bytes], request_json, send, send_error, is_cancelled) -> Job:
    """Build a Job from the llm step's inputs (batch dim already removed); the offline pipeline uses it too."""
    options = RequestOptions.from_json(request_json)
    responder = Responder(options, int(input_ids.shape[0]), send, send_error, int(image_embeds.shape[0]))
    return Job(input_ids.astype(np.int32), np.ascontiguousarray(image_embeds, dtype=np.float32),
               image_grid_thw.astype(np.int64).reshape(-1, 3), [bytes(h) for h in image_hashes],
               options, responder, is_cancelled)
