"""vision_encoder with runtime=onnxruntime on a real tritonserver: the graph is exported at load
(onnx_path missing), the model called directly returns transformers' embeddings, and greedy answers
through the public model equal generate()."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from helpers import Reference, infer_http, make_image, running_server  # noqa: E402

TOLERANCE = 1e-4  # largest |served - transformers| / largest |transformers|, fp32
SIZES = [(56, 56), (300, 100), (120, 330), (84, 420), (640, 480)]
MAX = 12


@pytest.fixture(scope="module")
def onnx_server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_server")
    graph = tmp / "vision_encoder.onnx"  # absent: the vision_encoder exports it while loading
    # a long batcher delay so that concurrent requests surely meet in one batch
    # internal_inputs open: these tests call vision_encoder directly with their own pixel rows
    overrides = {"vision_encoder": {"runtime": "onnxruntime", "onnx_path": str(graph), "internal_inputs": "open",
                                    "max_queue_delay_microseconds": "300000"}}
    with running_server(model_dir, tmp, overrides=overrides, ready_timeout=600) as srv:
        yield srv, graph


@pytest.fixture(scope="module")
def ref(model_dir):
    return Reference(str(model_dir))


@pytest.fixture(scope="module")
def images(ref):
    """(png bytes, pixel_values, grid) per size, from the model's own image processor."""
    from PIL import Image

    out = []
    for i, (w, h) in enumerate(SIZES):
        png = make_image(w, h, seed=20 + i)
        px = ref.ip(images=[Image.open(io.BytesIO(png)).convert("RGB")], return_tensors="np")
        out.append((png, px["pixel_values"].astype(np.float32), px["image_grid_thw"].astype(np.int64)))
    return out


def _encode(url: str, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = [grpcclient.InferInput("pixel_values", [1, *pixels.shape], "FP32"),
                  grpcclient.InferInput("image_grid_thw", [1, *grid.shape], "INT64")]
        inputs[0].set_data_from_numpy(pixels[None])
        inputs[1].set_data_from_numpy(grid[None])
        res = client.infer("vision_encoder", inputs)
        return res.as_numpy("image_embeds")
    finally:
        client.close()


def _transformers_embeds(ref, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    torch = ref.torch
    with torch.inference_mode():
        out = ref.model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output
    return out.numpy()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    got = got.reshape(want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_the_graph_was_exported_at_load_and_onnxruntime_serves(onnx_server):
    srv, graph = onnx_server
    assert graph.is_file()
    log = srv.log_tail(200_000)
    assert "exporting the tower" in log, log[-3000:]
    assert "onnxruntime" in log and "CPUExecutionProvider" in log, log[-3000:]


def test_vision_encoder_returns_transformers_embeddings(onnx_server, ref, images):
    srv, _ = onnx_server
    for _, pixels, grid in images:
        assert _rel(_encode(srv.grpc_url, pixels, grid), _transformers_embeds(ref, pixels, grid)) <= TOLERANCE


def test_one_request_with_three_images_of_different_sizes(onnx_server, ref, images):
    srv, _ = onnx_server
    pick = [images[i] for i in (4, 0, 2)]
    pixels = np.concatenate([p for _, p, _ in pick])
    grid = np.concatenate([g for _, _, g in pick])
    assert _rel(_encode(srv.grpc_url, pixels, grid), _transformers_embeds(ref, pixels, grid)) <= TOLERANCE


def test_concurrent_requests_batched_together_stay_apart(onnx_server, ref, images):
    """Requests sent at once reach one dynamic batch (one ragged onnxruntime run) and come back whole."""
    srv, _ = onnx_server
    before = _counts(srv.grpc_url)
    with ThreadPoolExecutor(len(images)) as pool:
        got = list(pool.map(lambda im: _encode(srv.grpc_url, im[1], im[2]), images))
    requests, runs = (a - b for a, b in zip(_counts(srv.grpc_url), before))
    assert requests == len(images) and runs < requests  # at least two requests shared a run
    for (_, pixels, grid), embeds in zip(images, got):
        assert _rel(embeds, _transformers_embeds(ref, pixels, grid)) <= TOLERANCE


def _counts(url: str) -> tuple[int, int]:
    """(requests, model executions) of vision_encoder so far (Triton's statistics)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("vision_encoder", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
    finally:
        client.close()


@pytest.mark.parametrize("pick", [(0,), (1,), (4,), (2, 3)])
def test_greedy_answers_equal_generate(onnx_server, ref, images, pick):
    srv, _ = onnx_server
    pngs = [images[i][0] for i in pick]
    out = infer_http(srv.http_url, text_input="Describe the image.", image=pngs, max_tokens=MAX,
                     temperature=0.0, exclude_input_in_output=True)
    assert out["output_ids"] == ref.generate("Describe the image.", pngs, max_tokens=MAX)
