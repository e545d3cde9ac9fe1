"""The data-dependent part of Qwen2.5-VL's vision tower, computed on the host with numpy.

transformers computes the window index, ``cu_seqlens``, ``cu_window_seqlens`` and the rotary
position ids from the *values* of ``grid_thw`` (loops, ``repeat_interleave``, ``unique``): shapes an
exported graph cannot follow. Here they are computed in numpy (the same numbers as
transformers.vision_utils, checked by tests/unit/test_onnx_vision.py) and handed to the ONNX graph
as inputs, so the graph only ever sees a dynamic number of patches.

Attention segments (images for the full-attention blocks, windows for the others) reach the graph
as a padded gather table ``[segments, longest]`` (-1 = padding) plus each token's slot in it, so
attention is computed per segment on a dense block instead of as one masked ``N x N`` product.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_NAMES = ("pixel_values", "window_index", "reverse_index", "position_ids",
               "full_segments", "full_slots", "window_segments", "window_slots")


@dataclass(frozen=True)
class TowerGeometry:
    """The vision config values the host layout depends on."""

    spatial_merge_size: int
    window_size: int
    patch_size: int

    @classmethod
    def from_config(cls, vision_config) -> TowerGeometry:
        return cls(int(vision_config.spatial_merge_size), int(vision_config.window_size),
                   int(vision_config.patch_size))

    @classmethod
    def from_model_dir(cls, model_dir: str) -> TowerGeometry:
        """From config.json alone (no transformers import: the onnxruntime path needs no torch)."""
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        vision = cfg.get("vision_config", {})
        return cls(int(vision.get("spatial_merge_size", 2)), int(vision.get("window_size", 112)),
                   int(vision.get("patch_size", 14)))

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


def position_ids(grid: np.ndarray, merge: int) -> np.ndarray:
    """Rotary (h, w) ids per patch in merge-block order: int64 [patches, 2]."""
    out = []
    for t, h, w in grid.tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def cu_seqlens(grid: np.ndarray) -> np.ndarray:
    """Full-attention boundaries (one segment per frame): int32 [frames + 1]."""
    lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def window_index(grid: np.ndarray, geo: TowerGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Merged-token order that groups windows together, and the window boundaries in patches.

    Returns (window_index int64 [patches / merge_unit], cu_window_seqlens int32 [windows + 1]).
    """
    win = geo.window_size // geo.spatial_merge_size // geo.patch_size  # window side in merged tokens
    index, cu, offset = [], [0], 0
    for t, h, w in grid.tolist():
        gh, gw = h // geo.spatial_merge_size, w // geo.spatial_merge_size
        ids = np.arange(t * gh * gw).reshape(t, gh, gw)
        # transformers pads by a whole window when the side is already a multiple (an empty window,
        # dropped below as a repeated boundary): the same arithmetic keeps the same windows
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(ids, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        counts = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(counts) * geo.merge_unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu_arr = np.asarray(cu, dtype=np.int32)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    return np.concatenate(index).astype(np.int64), cu_arr[keep]


def segments(cu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries -> (gather table int64 [segments, longest] with -1 padding, slot int64 [tokens]).

    Row s holds the token positions of segment s; ``slots[i]`` is token i's place in the flattened
    table, which brings the per-segment attention output back to token order.
    """
    lengths = np.diff(cu).astype(np.int64)
    lengths = lengths[lengths > 0]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    longest = int(lengths.max()) if len(lengths) else 0
    col = np.arange(longest, dtype=np.int64)
    table = np.where(col < lengths[:, None], starts[:, None] + col, -1)
    seg = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    slots = seg * longest + (np.arange(int(lengths.sum()), dtype=np.int64) - starts[seg])
    return table, slots


def graph_inputs(pixels: np.ndarray, grid: np.ndarray, geo: TowerGeometry) -> dict[str, np.ndarray]:
    """Everything the exported graph takes, for one batch of images (``grid`` [images, 3])."""
    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
    widx, cu_window = window_index(grid, geo)
    # rotary ids follow the tokens into window order (transformers permutes cos/sin the same way)
    pos = position_ids(grid, geo.spatial_merge_size)
    pos = pos.reshape(-1, geo.merge_unit, 2)[widx].reshape(-1, 2)
    full_table, full_slots = segments(cu_seqlens(grid))
    window_table, window_slots = segments(cu_window)
    return {
        "pixel_values": np.ascontiguousarray(pixels, dtype=np.float32),
        "window_index": widx,
        "reverse_index": np.argsort(widx, kind="stable").astype(np.int64),
        "position_ids": pos,
        "full_segments": full_table,
        "full_slots": full_slots,
        "window_segments": window_table,
        "window_slots": window_slots,
    }
