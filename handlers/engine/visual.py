"""Where a prompt's images and videos sit: per-token modality and the kind of each grid row.

The vision step's rows (``image_grid_thw``) hold every image and video of a request in prompt order;
the placeholder tokens in ``input_ids`` say which is which (``<|image_pad|>`` or ``<|video_pad|>``).
torch-free: the runner turns the result into the model's rope-index arguments.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.modelinfo import ModelInfo

TEXT, IMAGE, VIDEO = 0, 1, 2  # transformers' mm_token_type_ids values


def mm_token_types(input_ids: np.ndarray, info: ModelInfo) -> np.ndarray:
    """int32 [L]: 1 at image placeholders, 2 at video placeholders, 0 elsewhere."""
    types = np.zeros(input_ids.shape[0], np.int32)
    types[input_ids == info.image_token_id] = IMAGE
    types[input_ids == info.video_token_id] = VIDEO
    return types


def grid_kinds(types: np.ndarray, grid: np.ndarray, merge_unit: int) -> np.ndarray:
    """int [rows]: IMAGE or VIDEO per grid row, read at the first placeholder each row's tokens take.

    Each row takes t*h*w / merge_unit placeholders, in order; they must all be of one kind and the
    counts must add up to the prompt's placeholders (else the request is refused)."""
    positions = np.flatnonzero(types)
    counts = [int(np.prod(row)) // merge_unit for row in grid]
    if sum(counts) != positions.shape[0]:
        raise InvalidArgument(f"the prompt holds {positions.shape[0]} image/video placeholder tokens for "
                              f"{len(counts)} images and videos of {sum(counts)} tokens")
    kinds, start = np.zeros(len(counts), np.int64), 0
    for i, n in enumerate(counts):
        run = types[positions[start:start + n]]
        if n and (run != run[0]).any():
            raise InvalidArgument(f"image/video {i}: its {n} placeholder tokens mix image and video tokens")
        kinds[i] = run[0] if n else IMAGE
        start += n
    return kinds


def image_spans(input_ids: np.ndarray, image_token_id: int | tuple[int, ...], hashes: list[bytes],
                grid: np.ndarray, merge_unit: int) -> list[tuple[int, int, bytes]]:
    """(start, length, content key) of each run of image (or video) placeholders, in prompt order.

    An item (one hash, one ``grid`` row of t*h*w/merge_unit tokens) is one run, or several when text
    splits it (Qwen3-VL puts a timestamp before each of a video's temporal patches): then each run's
    key is the item's hash with the run's index."""
    is_img = np.concatenate([[False], np.isin(input_ids, image_token_id), [False]])
    edges = np.flatnonzero(np.diff(is_img.astype(np.int8)))
    runs = list(zip(edges[0::2].tolist(), (edges[1::2] - edges[0::2]).tolist()))
    out, r = [], 0
    for key, row in zip(hashes, grid):
        left, k = int(np.prod(row)) // merge_unit, 0
        while left > 0 and r < len(runs):
            start, length = runs[r]
            if length > left:
                break
            out.append((start, length, key if k == 0 and length == left else
                        hashlib.blake2b(key + k.to_bytes(4, "little"), digest_size=16).digest()))
            left, k, r = left - length, k + 1, r + 1
        if left:
            break
    if r != len(runs) or len(hashes) != len(grid) or len(out) < len(hashes):
        raise InvalidArgument(f"{len(runs)} image placeholder runs for {len(hashes)} images: they do not match")
    return out


def content_keys(embeds: np.ndarray, grid: np.ndarray, merge_unit: int) -> list[bytes]:
    """The prefix-cache key of each image / video: a hash of the embedding rows the llm received for it
    (and its grid), computed here rather than taken from the caller, so that a request cannot file K/V
    under another image's key (embeddings forged for a real image's hash; issue 24)."""
    keys, start = [], 0
    for row in grid:
        n = int(np.prod(row)) // merge_unit
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(row, dtype=np.int64).tobytes())
        h.update(memoryview(np.ascontiguousarray(embeds[start:start + n])).cast("B"))
        keys.append(h.digest())
        start += n
    return keys


def timed_spans(spans: list[tuple[int, int, bytes]], input_ids: np.ndarray, info: ModelInfo,
                second_per_grid_ts: list[float]) -> list[tuple[int, int, bytes]]:
    """Prefix-cache keys of placeholder runs: a video's content hash also takes its second_per_grid_t
    (the same frames sampled at another rate get other mRoPE time positions, so other K/V)."""
    import struct

    times = iter(second_per_grid_ts)
    out = []
    for start, length, key in spans:
        if input_ids[start] == info.video_token_id:
            t = next(times, None)
            if t is not None:
                key = hashlib.blake2b(key + struct.pack("<d", float(t)), digest_size=16).digest()
        out.append((start, length, key))
    return out
