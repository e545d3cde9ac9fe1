"""The llm model's Triton edge: its input tensors -> a Job, the engine's records -> its output tensors.

Outputs (docs/INTERFACE.md): text_output, output_ids, num_input_tokens, num_output_tokens,
num_image_tokens (the visual tokens of the request's images and videos together), finish_reason (the
last response only), logprobs (one JSON object per token of output_ids, when asked), media_sizes
(preprocess's JSON input handed back unchanged, the first response only).
"""

from __future__ import annotations

import json

import numpy as np

from tritonvl.handlers.engine.job import Job
from tritonvl.handlers.engine.outputs import SeqOutput

INPUTS = ("input_ids", "image_embeds", "image_grid_thw", "image_hashes")
SEALS = ("request_seal", "embeds_seal")  # handlers/seals.py


def check_seals(sealer, arrays: list[np.ndarray], request_json, seals: list[np.ndarray | None]) -> None:
    """preprocess's seal over (input_ids, image_grid_thw, request) and vision_encoder's over
    (image_embeds, image_grid_thw): the llm takes only what this server's pipeline made."""
    input_ids, embeds, grid, _ = arrays
    request_seal, embeds_seal = seals
    sealer.check(request_seal, "request", input_ids, grid, request_json, what="llm")
    sealer.check(embeds_seal, "embeds", embeds, grid, what="llm")


def job_from_tensors(arrays: list[np.ndarray], request_json, emit, emit_error, is_cancelled) -> Job:
    """``arrays``: the INPUTS tensors in that order, batch dim removed."""
    input_ids, embeds, grid, hashes = arrays
    return Job.create(input_ids, embeds, grid, hashes, request_json, emit, emit_error, is_cancelled)


def encoder(media_sizes: np.ndarray | None):
    """``output_tensors`` for one request, with its ``media_sizes`` input (None: absent) added to its first
    response: the public models' way to send preprocess's geometry once (a Triton ensemble cannot send
    outputs of a non-decoupled step beside a decoupled one's)."""
    if media_sizes is None:
        return output_tensors
    pending = [np.array([bytes(x) for x in np.asarray(media_sizes).reshape(-1)[:1]], dtype=np.object_)]

    def encode(record: SeqOutput) -> dict[str, np.ndarray]:
        out = output_tensors(record)
        if pending:  # the pump encodes one request's responses in order, on its one thread
            out["media_sizes"] = pending.pop()
        return out

    return encode


def output_tensors(record: SeqOutput) -> dict[str, np.ndarray]:
    """One record as the llm's output tensors (no batch dim)."""
    out = {
        "text_output": np.array([record.text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.asarray(record.token_ids, dtype=np.int32),
        "num_input_tokens": np.array([record.num_input_tokens], dtype=np.uint32),
        "num_output_tokens": np.array([record.num_output_tokens], dtype=np.uint32),
        "num_image_tokens": np.array([record.num_visual_tokens], dtype=np.uint32),
    }
    if record.finish_reason is not None:
        out["finish_reason"] = np.array([record.finish_reason.encode()], dtype=np.object_)
    if record.logprobs is not None:
        out["logprobs"] = np.array([json.dumps(e).encode() for e in record.logprobs], dtype=np.object_)
    return out
