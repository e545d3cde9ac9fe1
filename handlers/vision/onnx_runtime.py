"""The vision tower as an ONNX graph run by onnxruntime (``vision_encoder`` runtime=onnxruntime).

The execution provider follows the instance's device: the CPU; on ``cuda:N`` TensorRT then CUDA
when this onnxruntime build has them; on ``npu:N`` Ascend's CANN. ``providers`` (the
``onnx_providers`` parameter) overrides the choice with a comma list of provider names.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tritonvl.handlers.vision.layout import TowerGeometry, graph_inputs

log = logging.getLogger("tritonvl.onnx")


def providers_for(device: str, available: list[str], cache_dir: str = "",
                  requested: list[str] | None = None) -> list:
    """onnxruntime providers (with options) for a torch-style device string."""
    kind, _, idx = device.partition(":")
    dev = {"device_id": int(idx or 0)}
    options = {
        "TensorrtExecutionProvider": {**dev, "trt_engine_cache_enable": bool(cache_dir),
                                      **({"trt_engine_cache_path": cache_dir} if cache_dir else {})},
        "CUDAExecutionProvider": dev,
        "CANNExecutionProvider": dev,
        "CPUExecutionProvider": {},
    }
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ValueError(f"onnx_providers {unknown} not in this onnxruntime build (has {available})")
        names = list(requested)
    elif kind == "cuda":
        names = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    elif kind == "npu":
        names = ["CANNExecutionProvider"]
    else:
        names = []
    names = [n for n in names if n in available and n != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    if kind in ("cuda", "npu") and len(names) == 1:
        log.warning("vision_encoder: device %s but onnxruntime has only %s: running on the CPU",
                    device, available)
    return [(n, options.get(n, {})) for n in names]


class OnnxTower:
    """``(pixel_values [patches, patch_dim], grid_thw [images, 3]) -> embeds [merged, hidden]``."""

    def __init__(self, path: str, geometry: TowerGeometry, device: str = "cpu", num_threads: int = 0,
                 providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_threads > 0:
            opts.intra_op_num_threads = num_threads
        chosen = providers_for(device, ort.get_available_providers(), str(Path(path).parent / "trt_cache"),
                               providers)
        self.session = ort.InferenceSession(path, sess_options=opts, providers=chosen)
        self.geometry = geometry
        self.merge_unit = geometry.merge_unit
        self.hidden = int(self.session.get_outputs()[0].shape[1])
        self.inputs = [i.name for i in self.session.get_inputs()]
        log.warning("vision_encoder: onnxruntime %s on %s, providers %s", ort.__version__, device,
                    self.session.get_providers())

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
        feed = graph_inputs(pixels, grid, self.geometry)
        return self.session.run(None, {name: feed[name] for name in self.inputs})[0]
