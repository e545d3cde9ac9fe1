"""Faults inside the engine stay with their request: admission maps only request errors to their
own codes (anything else goes out as an internal error, logged); a sampling fault fails one sequence
while the rest of the batch carries on. Runs the real engine on the tiny model, in process."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from tritonvl.handlers.engine.sampler import SeqSampler
from tritonvl.handlers.preprocess.preprocessor import RawRequest
from tritonvl.handlers.tools.offline import OfflinePipeline


@pytest.fixture(scope="module")
def pipe(model_dir):
    with OfflinePipeline(model_dir, kv_cache_bytes=1 << 24, max_num_seqs=4) as p:
        yield p


def test_device_fault_at_admission_is_internal_not_invalid_arg(pipe, monkeypatch, caplog):
    """Out of device memory while preparing a sequence is our fault: the request fails with that
    error (the adapter sends a non-request error as INTERNAL), logged with its reason; before, it
    went out as INVALID_ARG."""

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipe.engine.runner, "prepare", oom)
    with caplog.at_level(logging.ERROR, logger="tritonvl.engine"):
        (res,) = pipe.generate([RawRequest(text_input=b"Hello", sampling={"max_tokens": 4})])
    assert res.error.startswith("OutOfMemoryError: CUDA out of memory"), res.error
    assert any("admitting a request failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_request_error_at_admission_keeps_its_code(pipe):
    from tritonvl.client.rules.errors import InvalidArgument, RequestError
    from tritonvl.handlers.engine.job import Job
    from tritonvl.handlers.engine.outputs import Responder
    from tritonvl.handlers.options import RequestOptions
    from tritonvl.handlers.sampling import SamplingParams

    inputs = pipe.pre.process(RawRequest(text_input=b"Hello", sampling={"max_tokens": 4}))
    errors = []
    options = RequestOptions(SamplingParams(max_tokens=4))
    responder = Responder(options, len(inputs.input_ids), lambda record: None, errors.append)
    enc = pipe.vision.encode([(inputs.pixel_values, inputs.image_grid_thw)])[0]
    # a token id outside the vocabulary (a direct caller's): the request's own fault
    ids = inputs.input_ids.copy()
    ids[0] = 10**7
    pipe.engine.submit(Job(ids, enc.embeds, inputs.image_grid_thw, [], options, responder))
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline:
        time.sleep(0.02)
    (err,) = errors
    assert isinstance(err, InvalidArgument) and isinstance(err, RequestError) and err.code == "INVALID_ARG"
    assert "outside the vocabulary" in str(err)


def test_sampling_fault_fails_one_sequence_alone(pipe, monkeypatch):
    real = SeqSampler.__call__

    def broken(self, logits):
        if self.params.seed == 13:
            raise RuntimeError("probability tensor contains inf")
        return real(self, logits)

    monkeypatch.setattr(SeqSampler, "__call__", broken)
    bad, good, sampled = pipe.generate([
        RawRequest(text_input=b"One", sampling={"max_tokens": 6, "temperature": 0.8, "seed": 13}),
        RawRequest(text_input=b"Two", sampling={"max_tokens": 6}),
        RawRequest(text_input=b"Three", sampling={"max_tokens": 6, "temperature": 0.8, "seed": 5})])
    assert bad.error == "RuntimeError: probability tensor contains inf" and not bad.token_ids
    assert not good.error and len(good.token_ids) == 6 and good.finish_reason == "length"
    assert not sampled.error and len(sampled.token_ids) == 6
