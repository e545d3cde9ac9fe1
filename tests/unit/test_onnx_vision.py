"""The ONNX vision tower: host layout vs transformers, the exported graph vs torch, providers."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tritonvl.handlers.vision import layout as L  # noqa: E402

# (width, height) of the test images: small square, wide, tall, thin, large (downscaled), odd
SIZES = [(56, 56), (300, 100), (120, 330), (84, 420), (640, 480), (333, 177)]
TOLERANCE = 1e-4  # largest |onnx - torch| / largest |torch|, fp32
GRIDS = [[[1, 16, 16]], [[1, 8, 24], [1, 20, 12]], [[1, 4, 4]], [[2, 6, 10]],
         [[1, 34, 10], [1, 2, 2], [1, 16, 18]], [[1, 32, 32]]]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_host_layout_equals_transformers(grid):
    torch = pytest.importorskip("torch")
    from transformers import vision_utils as vu

    geo = L.TowerGeometry(2, 112, 14)
    g, tg = np.array(grid), torch.tensor(grid)
    widx, cu_win = L.window_index(g, geo)
    ref_widx, ref_cu_win = vu.get_vision_window_index(tg, 2, 112, 14)
    np.testing.assert_array_equal(widx, ref_widx.numpy())
    np.testing.assert_array_equal(cu_win, ref_cu_win.numpy())
    np.testing.assert_array_equal(L.cu_seqlens(g), vu.get_vision_cu_seqlens(tg).numpy())
    np.testing.assert_array_equal(L.position_ids(g, 2), vu.get_vision_position_ids(tg, 2).numpy())


def test_segments_gather_and_slots_round_trip():
    table, slots = L.segments(np.array([0, 3, 3, 8, 10], dtype=np.int32))  # an empty segment is dropped
    assert table.tolist() == [[0, 1, 2, -1, -1], [3, 4, 5, 6, 7], [8, 9, -1, -1, -1]]
    tokens = np.arange(10)
    np.testing.assert_array_equal(np.where(table >= 0, tokens[table.clip(0)], -1).reshape(-1)[slots], tokens)


@pytest.fixture(scope="module")
def onnx_file(model_dir, tmp_path_factory):
    """Exported through the real CLI (which also checks the graph and compares it with torch)."""
    from tritonvl.client.cli import main

    out = tmp_path_factory.mktemp("onnx") / "vision_encoder.onnx"
    assert main(["export-onnx", "--model", str(model_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def towers(model_dir, onnx_file):
    import torch

    from tritonvl.handlers.vision.encoder import TorchTower, load_tower

    return (TorchTower(str(model_dir), "cpu", torch.float32),
            load_tower(str(model_dir), "cpu", torch.float32, "onnxruntime", str(onnx_file)))


@pytest.fixture(scope="module")
def images(model_dir):
    """pixel_values and grid of each test image, from the model's own image processor."""
    from helpers import make_image
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))
    out = []
    for i, (w, h) in enumerate(SIZES):
        px = ip(images=[Image.open(io.BytesIO(make_image(w, h, seed=i))).convert("RGB")], return_tensors="np")
        out.append((px["pixel_values"].astype(np.float32), px["image_grid_thw"].astype(np.int64)))
    assert len({tuple(g[0]) for _, g in out}) == len(SIZES)  # all grids differ
    return out


def _rel(got, ref) -> float:
    from tritonvl.handlers.vision.onnx_export import relative_difference

    return relative_difference(got, ref)


def test_onnx_equals_torch_image_by_image(towers, images):
    torch_tower, onnx_tower = towers
    for pixels, grid in images:
        assert _rel(onnx_tower(pixels, grid), torch_tower(pixels, grid)) <= TOLERANCE, grid


@pytest.mark.parametrize("pick", [(0, 1, 2), (4, 3, 5), (2, 4, 0)])
def test_onnx_equals_torch_on_a_ragged_batch_of_three(towers, images, pick):
    torch_tower, onnx_tower = towers
    pixels = np.concatenate([images[i][0] for i in pick])
    grid = np.concatenate([images[i][1] for i in pick])
    got, ref = onnx_tower(pixels, grid), torch_tower(pixels, grid)
    assert got.shape == ref.shape == (int(np.prod(grid, axis=1).sum()) // 4, torch_tower.hidden)
    assert _rel(got, ref) <= TOLERANCE
    # and each image's rows equal that image encoded alone (the segments keep images apart)
    start = 0
    for i in pick:
        n = int(np.prod(images[i][1])) // 4
        assert _rel(got[start:start + n], torch_tower(*images[i])) <= TOLERANCE
        start += n


def test_encoder_with_either_runtime_gives_the_same_embeddings_and_keys(towers, images):
    from tritonvl.handlers.vision.encoder import VisionEncoder

    batch = [(np.concatenate([images[0][0], images[1][0]]), np.concatenate([images[0][1], images[1][1]])),
             images[2], images[0]]
    a, b = (VisionEncoder(t).encode(batch) for t in towers)
    for x, y in zip(a, b):
        assert x.hashes == y.hashes and x.embeds.shape == y.embeds.shape
        assert _rel(y.embeds, x.embeds) <= TOLERANCE


def test_weights_in_an_external_file_load_and_match(model_dir, towers, images, tmp_path):
    """Towers past protobuf's 2 GB (3B and up) keep their weights beside the graph."""
    from tritonvl.handlers.vision.encoder import load_tower
    from tritonvl.handlers.vision.onnx_export import export

    path = export(str(model_dir), tmp_path / "v.onnx", external_data=True)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["v.onnx", "v.onnx.data"]
    assert path.stat().st_size < (tmp_path / "v.onnx.data").stat().st_size
    tower = load_tower(str(model_dir), "cpu", None, "onnxruntime", str(path))
    assert _rel(tower(*images[1]), towers[0](*images[1])) <= TOLERANCE


def test_onnx_path_missing_is_exported_once(model_dir, onnx_file, tmp_path):
    """A missing graph is exported under a lock; an existing one is used as is (no second export)."""
    import os
    import shutil

    from tritonvl.handlers.vision.onnx_export import ensure_exported

    target = tmp_path / "g.onnx"
    shutil.copyfile(onnx_file, target)
    before = os.stat(target).st_mtime_ns
    assert ensure_exported(str(model_dir), target) == target and os.stat(target).st_mtime_ns == before


def test_providers_follow_the_device():
    from tritonvl.handlers.vision.onnx_runtime import providers_for

    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CANNExecutionProvider", "CPUExecutionProvider"]
    names = lambda chosen: [n for n, _ in chosen]  # noqa: E731
    assert names(providers_for("cpu", every)) == ["CPUExecutionProvider"]
    cuda = providers_for("cuda:1", every, cache_dir="/c")
    assert names(cuda) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda[0][1]["device_id"] == 1 and cuda[0][1]["trt_engine_cache_path"] == "/c"
    assert names(providers_for("cuda:0", ["CUDAExecutionProvider", "CPUExecutionProvider"])) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert names(providers_for("npu:2", every)) == ["CANNExecutionProvider", "CPUExecutionProvider"]
    assert names(providers_for("cuda:0", ["CPUExecutionProvider"])) == ["CPUExecutionProvider"]
    assert names(providers_for("cuda:0", every, requested=["CUDAExecutionProvider"])) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="TensorrtExecutionProvider"):
        providers_for("cuda:0", ["CPUExecutionProvider"], requested=["TensorrtExecutionProvider"])


def test_unknown_runtime_is_refused(model_dir):
    from tritonvl.handlers.vision.encoder import load_tower

    with pytest.raises(ValueError, match="onnxruntime"):
        load_tower(str(model_dir), "cpu", None, runtime="tensorflow")
