"""Baseline llm backend: transformers' own generate(), one request at a time per instance.

The vision tower's output comes in precomputed (``mm_encoder_outputs``); sampling, stops,
streaming and cancellation go through the same components as the engine, hooked into
generate() as a logits processor (which picks the token) and a stopping criterion (which books it).
"""

from __future__ import annotations

import logging
import queue
import threading

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tritonvl.client.rules.errors import InvalidArgument, Unavailable
from tritonvl.handlers.devices import start_compute_thread
from tritonvl.handlers.engine.job import Job
from tritonvl.handlers.engine.sampler import SeqSampler
from tritonvl.handlers.engine.sequence import stop_ids_for, token_ending
from tritonvl.handlers.engine.textstream import OutputStream
from tritonvl.handlers.modelinfo import ModelInfo
from tritonvl.handlers.weights import load_full_model

log = logging.getLogger("tritonvl.generate")


class _Pick(LogitsProcessor):
    """Choose the token with our sampler and leave generate()'s argmax no other choice."""

    def __init__(self, sampler: SeqSampler) -> None:
        self.sampler = sampler

    def __call__(self, input_ids, scores):
        token = self.sampler(scores[0])
        forced = torch.full_like(scores, -float("inf"))
        forced[:, token] = 0.0
        return forced


class _Book(StoppingCriteria):
    def __init__(self, job: Job, stream: OutputStream, stop_ids: frozenset[int], stopping: threading.Event) -> None:
        self.job, self.stream, self.stop_ids, self.stopping = job, stream, stop_ids, stopping

    def __call__(self, input_ids, scores, **kwargs):
        token = int(input_ids[0, -1])
        p = self.stream.params
        text = self.stream.add(token, token_ending(token, len(self.stream.ids) + 1, self.stop_ids, p.min_tokens,
                                                   p.max_tokens))
        if self.stream.finished:
            self.job.responder.finish(self.stream.finish_reason, text, [token])
        elif self.job.is_cancelled() or self.stopping.is_set():
            self.stream.cancel()
            self.job.responder.finish("cancelled", text, [token])
        else:
            self.job.responder.delta(text, [token])
        return torch.tensor([self.stream.finished], device=input_ids.device)


class GenerateBackend:
    def __init__(self, model_dir: str, info: ModelInfo, tokenizer, device: str, dtype,
                 quantization: str = "none") -> None:
        self.info, self.tokenizer, self.device, self.dtype = info, tokenizer, device, dtype
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stopping = threading.Event()

        def load() -> None:
            self.model = load_full_model(model_dir, device, dtype, quantization, backend="generate")
            self.model.model.visual = None  # the vision_encoder model owns the tower

        # loads and generates on one thread (devices.start_compute_thread says why)
        self.thread = start_compute_thread("tritonvl-generate", device, load, self._loop)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """End the running job (finish_reason cancelled) and fail the queued ones."""
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.stopping.is_set():
                    job.responder.fail(Unavailable("the server is shutting down"))
                    continue
                if job.is_cancelled():
                    job.responder.finish("cancelled")
                    continue
                self.run(job)
            except Exception as exc:  # a fault of this job only: fail it, keep serving
                log.exception("generation failed")
                job.responder.fail(exc)

    def run(self, job: Job) -> None:
        job.check(self.info)
        params = job.options.sampling
        if params.structured_outputs:
            raise InvalidArgument("structured outputs need the llm parameter backend=engine (this is generate)")
        if job.options.logprobs >= 0:
            raise InvalidArgument("logprobs need the llm parameter backend=engine (this is generate)")
        ids = torch.from_numpy(job.input_ids.astype("int64"))[None].to(self.device)
        stream = OutputStream(self.tokenizer, params)
        stop_ids = stop_ids_for(params.stop_token_ids, params.ignore_eos, self.info.eos_token_ids)
        sampler = SeqSampler(params, job.input_ids.tolist(), stop_ids, self.device)
        kwargs = {}
        if job.grid_thw.shape[0] and (self.info.deepstack_layers or (ids == self.info.video_token_id).any()):
            raise InvalidArgument("videos and Qwen3-VL images need the llm parameter backend=engine (this is generate)")
        if job.grid_thw.shape[0]:
            embeds = torch.from_numpy(job.visual_embeds).to(self.device, self.dtype)
            kwargs = {
                "image_grid_thw": torch.from_numpy(job.grid_thw).to(self.device),
                "mm_token_type_ids": (ids == self.info.image_token_id).int(),
                "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=(embeds,))},
            }
        config = GenerationConfig(max_new_tokens=params.max_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=self.info.eos_token_ids[-1])
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                logits_processor=[_Pick(sampler)], stopping_criteria=[_Book(job, stream, stop_ids, self.stopping)],
                                **kwargs)
        if not job.responder.done:  # generate() stopped on its own (max_new_tokens reached)
            job.responder.finish(stream.finish_reason or "length")
