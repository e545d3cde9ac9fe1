"""vision_encoder: pixel_values FP32[-1, patch_dim] + image_grid_thw INT64[-1, 3] + pixel_seal ->
image_embeds FP32[-1, hidden] + image_hashes UINT8[-1, 16] (one content key per image) + embeds_seal.
Only inputs this server's preprocess sealed are taken (handlers/seals.py); a bad request fails alone.

One forward over the patches of every image of every request in the dynamic batch.
"""

import numpy as np

from tritonvl.handlers.devices import parse_dtype, prepare_device
from tritonvl.handlers.seals import Sealer, load_key
from tritonvl.handlers.tritonserver import adapter
from tritonvl.handlers.vision.encoder import VisionEncoder, load_tower


class TritonPythonModel:
    def initialize(self, args):
        model_args = adapter.ModelArgs(args, "vision_encoder")
        self.watchdog = adapter.watchdog(model_args)
        p = model_args.params
        device, dtype = prepare_device(model_args.device(), p.num_threads)
        tower = load_tower(model_args.model_dir(), device, parse_dtype(p.dtype, dtype), p.runtime, p.onnx_path,
                           p.num_threads, list(p.onnx_providers))
        self.encoder = VisionEncoder(tower, cache_bytes=p.embedding_cache_bytes)
        self.seals = Sealer(load_key(), enforce=p.internal_inputs == "sealed")
        self.metrics = adapter.TritonMetrics("vision_encoder", only=("image_cache_hits", "image_cache_misses"),
                                       version=model_args.version)

    def execute(self, requests):
        batch = [self.read(r) for r in requests]  # (pixels, grid), or the error that refuses the request
        results = iter(self.encoder.encode([b for b in batch if not isinstance(b, Exception)]))
        self.metrics.update(self.encoder.snapshot())
        return [adapter.error(b) if isinstance(b, Exception) else self.respond(next(results), b[1]) for b in batch]

    def read(self, request):
        """A request's inputs once its seal is checked (an unsealed one fails alone)."""
        pixels, grid, seal = (adapter.tensor(request, n) for n in ("pixel_values", "image_grid_thw", "pixel_seal"))
        pixels, grid, seal = (None if a is None else a[0] for a in (pixels, grid, seal))
        try:
            self.seals.check(seal, "pixel", pixels, grid, what="vision_encoder")
        except Exception as exc:
            return exc
        return pixels, grid

    def respond(self, res, grid):
        if isinstance(res, Exception):
            return adapter.error(res)
        return adapter.response({
            "image_embeds": res.embeds,
            "image_hashes": np.frombuffer(b"".join(res.hashes), dtype=np.uint8).reshape(-1, 16),
            "embeds_seal": self.seals.seal("embeds", res.embeds, grid),
        })

    def finalize(self):
        if self.watchdog:
            self.watchdog.stop()
        self.metrics.close()  # while the stub can still reach the server (adapter.TritonMetrics.close)
        adapter.finalized()
