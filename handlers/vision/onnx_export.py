"""Export Qwen2.5-VL's vision tower to ONNX (``tritonvl export-onnx``).

The graph is the tower's tensor work only: patch embedding, the blocks, the merger. What depends on
the values of ``image_grid_thw`` (window order, attention segments, rotary ids) comes in as inputs
computed by :mod:`tritonvl.handlers.vision.layout`, so every shape in the graph follows the number
of patches and the segment table sizes, never a value.

    inputs   pixel_values FP32 [patches, C*T*P*P], window_index / reverse_index INT64 [merged],
             position_ids INT64 [patches, 2], full_segments / window_segments INT64 [segs, longest],
             full_slots / window_slots INT64 [patches]
    output   image_embeds FP32 [merged, out_hidden]   (merged = patches / spatial_merge_size**2)
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tritonvl.handlers.vision.layout import INPUT_NAMES, TowerGeometry, graph_inputs

log = logging.getLogger("tritonvl.onnx")
DEFAULT_OPSET = 18
# a few image grids (t, h, w in patches) for the check after export: square, wide, tall, odd
CHECK_GRIDS = [[[1, 16, 16]], [[1, 8, 24]], [[1, 20, 12], [1, 6, 6]], [[1, 4, 4]]]


def default_onnx_path(model_dir: str) -> Path:
    return Path(model_dir) / "onnx" / "vision_encoder.onnx"


def _graph_module(visual):
    """The tower as an nn.Module over the host-computed inputs (built lazily: imports torch)."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    def segment_attention(attn, x, cos, sin, table, slots):
        # x [N, D]; table [S, L] token ids (-1 pad); slots [N] place of each token in S*L
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [N, H, d]
        idx = table.clamp(min=0)
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [S, H, L, d]
        scores = torch.matmul(qs, ks.transpose(-1, -2)) * attn.scaling  # [S, H, L, L]
        # padding keys never count; padded query rows are computed but never read back
        keep = (table >= 0)[:, None, None, :]
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), vs)  # [S, H, L, d]
        out = out.transpose(1, 2).reshape(-1, x.shape[1])[slots]  # [N, D]
        return attn.proj(out)

    class VisionGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            self.full_blocks = set(visual.fullatt_block_indexes)

        def forward(self, pixel_values, window_index, reverse_index, position_ids,
                    full_segments, full_slots, window_segments, window_slots):
            vis = self.visual
            x = vis.patch_embed(pixel_values)  # [N, D]
            dim = x.shape[1]
            x = x.reshape(-1, vis.spatial_merge_unit, dim)[window_index].reshape(-1, dim)
            cos, sin = vis.rotary_pos_emb(x, position_ids)  # ids already in window order
            for i, blk in enumerate(vis.blocks):
                table, slots = ((full_segments, full_slots) if i in self.full_blocks
                                else (window_segments, window_slots))
                x = x + segment_attention(blk.attn, blk.norm1(x), cos, sin, table, slots)
                x = x + blk.mlp(blk.norm2(x))
            return vis.merger(x)[reverse_index]

    return VisionGraph().eval()


def export(model_dir: str, out: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET,
           external_data: bool | None = None) -> Path:
    """Write the tower of ``model_dir`` as ONNX (fp32) and check it with onnx.checker.

    ``external_data``: weights in ``<out>.data`` beside the graph; None: when they pass 1.5 GiB.
    """
    import onnx
    import torch
    from torch.export import Dim

    from tritonvl.handlers.weights import load_visual

    out = Path(out) if out else default_onnx_path(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    visual = load_visual(model_dir, "cpu", torch.float32)
    geo = TowerGeometry.from_config(visual.config)
    graph = _graph_module(visual)
    # two images of different sizes, so no dimension is specialised to 1 or to a single image
    grid = np.array([[1, 8, 12], [1, 12, 8]], dtype=np.int64)
    pixels = np.random.default_rng(0).standard_normal((int(np.prod(grid, axis=1).sum()), _patch_dim(visual)))
    feed = graph_inputs(pixels.astype(np.float32), grid, geo)
    args = tuple(torch.from_numpy(feed[n]) for n in INPUT_NAMES)
    merged = Dim("merged", min=1)
    patches = geo.merge_unit * merged
    table = {"full_segments": (Dim("images", min=1), Dim("longest", min=1)),
             "window_segments": (Dim("windows", min=1), Dim("window_len", min=1))}
    by_name = {"pixel_values": (patches,), "window_index": (merged,), "reverse_index": (merged,),
               "position_ids": (patches,), "full_slots": (patches,), "window_slots": (patches,), **table}
    # in forward's argument order: the exporter pairs them with the graph inputs by position
    shapes = {n: dict(enumerate(by_name[n])) for n in INPUT_NAMES}
    # protobuf caps a file at 2 GB: bigger towers (3B and up: ~2.6 GB in fp32) keep their weights
    # in DIR/onnx/vision_encoder.onnx.data beside the graph
    external = external_data
    if external is None:
        external = sum(t.numel() * t.element_size() for t in visual.state_dict().values()) > 1.5 * 2**30
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
        program = torch.onnx.export(graph, args, input_names=list(INPUT_NAMES), output_names=["image_embeds"],
                                    dynamic_shapes=shapes, opset_version=opset, dynamo=True,
                                    external_data=external, verbose=False)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / out.name
        program.save(str(staged), external_data=external)
        _name_patch_axis(staged, f"{geo.merge_unit}*merged")
        onnx.checker.check_model(str(staged), full_check=True)
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f == staged):  # the graph last:
            os.replace(f, out.parent / f.name)  # readers never see it before its weights
    return out


def _name_patch_axis(path: Path, derived: str) -> None:
    """The exporter calls the patch axis "4*merged"; name it "patches" (trtexec/ATC users see it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == derived:
                dim.dim_param = "patches"
    onnx.save(model, str(path))


def _patch_dim(visual) -> int:
    pe = visual.patch_embed
    return pe.in_channels * pe.temporal_patch_size * pe.patch_size**2


def ensure_exported(model_dir: str, path: str | os.PathLike | None = None) -> Path:
    """``path`` (default DIR/onnx/vision_encoder.onnx), exported once if missing. Several instances
    starting together wait on a file lock beside it instead of exporting twice."""
    path = Path(path) if path else default_onnx_path(model_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            log.warning("vision_encoder: %s missing, exporting the tower from %s", path, model_dir)
            export(model_dir, path)
    return path


def compare(model_dir: str, path: str | os.PathLike, grids=CHECK_GRIDS, providers=None) -> float:
    """Largest relative difference (max |ort - torch| / max |torch|) over ``grids``, each grid one
    batch: the same images through transformers' tower and through the graph."""
    import torch

    from tritonvl.handlers.vision.onnx_runtime import OnnxTower
    from tritonvl.handlers.weights import load_visual

    visual = load_visual(model_dir, "cpu", torch.float32)
    tower = OnnxTower(str(path), TowerGeometry.from_config(visual.config), providers=providers)
    rng = np.random.default_rng(1)
    worst = 0.0
    for grid in grids:
        grid = np.asarray(grid, dtype=np.int64)
        pixels = rng.standard_normal((int(np.prod(grid, axis=1).sum()), _patch_dim(visual))).astype(np.float32)
        with torch.inference_mode():
            ref = visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()
        got = tower(pixels, grid)
        worst = max(worst, relative_difference(got, ref))
    return worst


def relative_difference(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {ref.shape}")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def main(model_dir: str | None, out: str | None, opset: int = DEFAULT_OPSET, tolerance: float = 1e-4) -> int:
    """``tritonvl export-onnx``: export, check, compare with torch; 1 when the graph drifts."""
    if not model_dir:
        from tritonvl.handlers.tiny_model import ensure_default_model

        model_dir = str(ensure_default_model())
    path = export(model_dir, out, opset)
    print(f"wrote {path} (opset {opset}, {path.stat().st_size / 2**20:.1f} MiB); onnx.checker: ok")
    worst = compare(model_dir, path)
    grids = "; ".join(",".join("x".join(map(str, g[1:])) for g in batch) for batch in CHECK_GRIDS)
    print(f"largest relative difference vs torch (fp32, batches {grids} patches): {worst:.2e}")
    if worst > tolerance:
        print(f"error: above the tolerance {tolerance:g}", file=sys.stderr)
        return 1
    return 0
