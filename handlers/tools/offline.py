"""The model repository's path without Triton: preprocess -> vision encoder -> engine, in one process.

For offline batches, profiling, and device checks (``scripts/gpu_check.py``): the same Preprocessor,
VisionEncoder and LLMEngine the three Triton models run, so what it measures is what the server runs
minus Triton's transport.

    with OfflinePipeline(model_dir, device="cuda:0") as pipe:
        results = pipe.generate([RawRequest(text_input=b"Describe it.", images=[png_bytes],
                                            sampling={"max_tokens": 64})])
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tritonvl.handlers.devices import parse_dtype, prepare_device
from tritonvl.handlers.engine.job import Job
from tritonvl.handlers.engine.outputs import SeqOutput
from tritonvl.handlers.modelinfo import load_model_info
from tritonvl.handlers.params import typed
from tritonvl.handlers.preprocess.preprocessor import Preprocessor, RawRequest
from tritonvl.handlers.vision.encoder import VisionEncoder, load_tower


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0
    error: str = ""
    logprobs: list[dict] = field(default_factory=list)  # when the request asked (return_logprobs)
    submitted: float = 0.0  # time.perf_counter() stamps
    first_token: float = 0.0
    finished: float = 0.0


class OfflinePipeline:
    """``engine_kwargs`` are llm parameters (handlers/params.py LLMParams: kv_cache_bytes, block_size,
    max_num_seqs, attention_backend, ...); the rest keep their defaults."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "auto", **engine_kwargs) -> None:
        from tritonvl.handlers.engine.engine import LLMEngine

        device, default_dtype = prepare_device(device)
        self.dtype = parse_dtype(dtype, default_dtype)
        self.pre = Preprocessor(str(model_dir))
        info = load_model_info(model_dir)
        params = typed("llm", **engine_kwargs)
        self.engine = LLMEngine(str(model_dir), info, self.pre.tokenizer, device, self.dtype, params)
        # the vision tower loads and runs on the engine thread too (LLMEngine.__init__: one thread of this
        # process does the torch work)
        self.vision = self.engine.call(lambda: VisionEncoder(load_tower(str(model_dir), device, self.dtype)))

    def generate(self, requests: list[RawRequest], timeout: float = 3600.0) -> list[Result]:
        """Run every request to its end (all in flight together); results in request order."""
        inputs = [self.pre.process(r) for r in requests]
        encoded = self.engine.call(lambda: self.vision.encode([(m.pixel_values, m.image_grid_thw) for m in inputs]))
        for enc in encoded:
            if isinstance(enc, Exception):  # preprocess made these inputs: the tower itself failed
                raise enc
        results = [Result(num_input_tokens=len(m.input_ids)) for m in inputs]
        remaining = [len(inputs)]
        all_done = threading.Event()
        lock = threading.Lock()

        def finished(res: Result) -> None:
            res.finished = time.perf_counter()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

        def make_callbacks(res: Result):
            def send(record: SeqOutput) -> None:
                if not res.first_token and record.token_ids:
                    res.first_token = time.perf_counter()
                res.text += record.text
                res.token_ids.extend(record.token_ids)
                res.logprobs.extend(record.logprobs or ())
                if record.finished:
                    res.finish_reason = record.finish_reason
                    finished(res)

            def send_error(exc: Exception) -> None:
                res.error = f"{type(exc).__name__}: {exc}"
                finished(res)

            return send, send_error

        if not inputs:
            return []
        for m, enc, res in zip(inputs, encoded, results):
            send, send_error = make_callbacks(res)
            job = Job.create(m.input_ids, enc.embeds, m.image_grid_thw, enc.hashes, m.request, send, send_error)
            res.submitted = time.perf_counter()
            self.engine.submit(job)
        if not all_done.wait(timeout):
            raise TimeoutError(f"{remaining[0]} of {len(inputs)} requests unfinished after {timeout} s")
        return results

    def close(self) -> None:
        self.engine.stop(drain_seconds=0.0)

    def __enter__(self) -> OfflinePipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
