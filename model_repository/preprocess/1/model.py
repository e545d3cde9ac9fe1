"""preprocess: public request tensors -> model inputs.

Inputs: the public interface of the ensemble (text_input, image, video, messages, sampling tensors,
sampling_parameters, stream, exclude_input_in_output). Outputs: input_ids INT32[-1],
pixel_values FP32[-1, patch_dim], image_grid_thw INT64[-1, 3], request STRING[1] (JSON options),
media_sizes STRING[1] (JSON geometry for the client, preprocess/media.py), and
pixel_seal / request_seal UINT8[32]: HMACs the next steps check (handlers/seals.py).
Bad input is a per-request INVALID_ARG error; the rest of the batch carries on.
"""

import numpy as np

from tritonvl.handlers.preprocess.preprocessor import Preprocessor, raw_request
from tritonvl.handlers.seals import Sealer, load_key
from tritonvl.handlers.tritonserver import adapter


class TritonPythonModel:
    def initialize(self, args):
        model_args = adapter.ModelArgs(args, "preprocess")
        self.watchdog = adapter.watchdog(model_args)
        self.pre = Preprocessor(model_args.model_dir(), model_args.params)
        self.seals = Sealer(load_key())
        self.metrics = adapter.TritonMetrics("preprocess", only=("video_cache_hits", "video_cache_misses"),
                                       version=model_args.version)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                m = self.pre.process(raw_request(adapter.Inputs(request)))
                options = m.request.encode()
                responses.append(adapter.response({
                    "input_ids": m.input_ids,
                    "pixel_values": m.pixel_values,
                    "image_grid_thw": m.image_grid_thw,
                    "request": np.array([options], dtype=np.object_),
                    "media_sizes": np.array([m.media_sizes.encode()], dtype=np.object_),
                    "pixel_seal": self.seals.seal("pixel", m.pixel_values, m.image_grid_thw),
                    "request_seal": self.seals.seal("request", m.input_ids, m.image_grid_thw, options),
                }))
            except Exception as exc:
                responses.append(adapter.error(exc))
        self.metrics.update(self.pre.clips.snapshot())
        return responses

    def finalize(self):
        if self.watchdog:
            self.watchdog.stop()
        self.metrics.close()  # while the stub can still reach the server (adapter.TritonMetrics.close)
        adapter.finalized()
