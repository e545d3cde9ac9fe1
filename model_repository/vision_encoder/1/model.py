"""vision_encoder: pixel_values FP32[-1, patch_dim] + image_grid_thw INT64[-1, 3] + pixel_seal ->
image_embeds FP32[-1, hidden] + image_hashes UINT8[-1, 16] (one content key per image) + embeds_seal.
Only inputs this server's preprocess sealed are taken (handlers/seals.py); a bad request fails alone.

One forward over the patches of every image of every request in the dynamic batch.
"""

import numpy as np

from tritonvl.handlers.devices import parse_dtype, prepare_device
from tritonvl.handlers.seals import Sealer, load_key
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
        self.seals = Sealer(load_key(), enforce=p.internal_inputs == "sealed")
        self.metrics = ta.TritonMetrics("vision_encoder", only=("image_cache_hits", "image_cache_misses"),
                                       version=cfg.version)

    def execute(self, requests):
        batch = [self.read(r) for r in requests]  # (pixels, grid), or the error that refuses the request
        results = iter(self.encoder.encode([b for b in batch if not isinstance(b, Exception)]))
        self.metrics.update(self.encoder.snapshot())
        return [ta.error(b) if isinstance(b, Exception) else self.respond(next(results), b[1]) for b in batch]

    def read(self, request):
        """A request's inputs once its seal is checked (an unsealed one fails alone)."""
        pixels, grid, seal = (ta.tensor(request, n) for n in ("pixel_values", "image_grid_thw", "pixel_seal"))
        pixels, grid, seal = (None if a is None else a[0] for a in (pixels, grid, seal))
        try:
            self.seals.check(seal, "pixel", pixels, grid, what="vision_encoder")
        except Exception as exc:
            return exc
        return pixels, grid

    def respond(self, res, grid):
        if isinstance(res, Exception):
            return ta.error(res)
        return ta.response({
            "image_embeds": res.embeds,
            "image_hashes": np.frombuffer(b"".join(res.hashes), dtype=np.uint8).reshape(-1, 16),
            "embeds_seal": self.seals.seal("embeds", res.embeds, grid),
        })

    def finalize(self):
        if self.watchdog:
            self.watchdog.stop()
        self.metrics.close()  # while the stub can still reach the server (adapter.TritonMetrics.close)
        ta.finalized()
