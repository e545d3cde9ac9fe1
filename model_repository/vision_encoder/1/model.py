"""vision_encoder: pixel_values FP32[-1, patch_dim] + image_grid_thw INT64[-1, 3] ->
image_embeds FP32[-1, hidden] + image_hashes UINT8[-1, 16] (one content key per image).

One forward over the patches of every image of every request in the dynamic batch.
"""

import numpy as np

from tritonvl.handlers.devices import parse_dtype, prepare_device
from tritonvl.handlers.tritonserver import adapter as ta
from tritonvl.handlers.vision.encoder import VisionEncoder, load_tower


class TritonPythonModel:
    def initialize(self, args):
        cfg = ta.ModelArgs(args, "vision_encoder")
        self.watchdog = ta.watchdog(cfg)
        p = cfg.params
        device, dtype = prepare_device(cfg.device(), p.num_threads)
        tower = load_tower(cfg.model_dir(), device, parse_dtype(p.dtype, dtype), p.runtime, p.onnx_path,
                           p.num_threads, list(p.onnx_providers))
        self.encoder = VisionEncoder(tower, cache_bytes=p.embedding_cache_bytes)
        self.metrics = ta.TritonMetrics("vision_encoder", only=("image_cache_hits", "image_cache_misses"),
                                       version=cfg.version)

    def execute(self, requests):
        batch = []
        for r in requests:  # a request without its inputs fails alone (Encoder.check)
            pixels, grid = ta.tensor(r, "pixel_values"), ta.tensor(r, "image_grid_thw")
            batch.append((None if pixels is None else pixels[0], None if grid is None else grid[0]))
        results = self.encoder.encode(batch)
        self.metrics.update(self.encoder.snapshot())
        return [ta.error(res) if isinstance(res, Exception) else ta.response({
            "image_embeds": res.embeds,
            "image_hashes": np.frombuffer(b"".join(res.hashes), dtype=np.uint8).reshape(-1, 16),
        }) for res in results]

    def finalize(self):
        if self.watchdog:
            self.watchdog.stop()
