"""The llm step trusts nothing it is sent (issue 24): a direct caller's inputs are checked at
admission with INVALID_ARG naming the field, so they never reach a step shared with other requests,
and the prefix cache keys each image by the embeddings the llm received, so forged embeddings under a
real image's hash cannot change what the next request with that image gets. Real engine, tiny model."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from helpers import make_image

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.engine.job import Job
from tritonvl.handlers.preprocess.preprocessor import RawRequest
from tritonvl.handlers.tools.offline import OfflinePipeline

IMAGE = make_image(96, 72, seed=3)


@pytest.fixture(scope="module")
def pipe(model_dir):
    with OfflinePipeline(model_dir, kv_cache_bytes=1 << 24, max_num_seqs=4) as p:
        yield p


def submit(pipe, input_ids, embeds, grid, hashes, request_json, timeout=60):
    """One job straight into the engine, as a direct call to the llm model makes it; its records."""
    out, errors, done = [], [], threading.Event()

    def emit(record):
        out.append(record)
        if record.finished:
            done.set()

    def fail(exc):
        errors.append(exc)
        done.set()

    try:
        pipe.engine.submit(Job.create(input_ids, embeds, grid, hashes, request_json, emit, fail))
    except InvalidArgument as exc:  # refused while building the job (the llm model sends it back)
        return [], [exc]
    assert done.wait(timeout)
    return out, errors


def real(pipe, text=b"What is in the picture?", max_tokens=8):
    raw = RawRequest(text_input=text, images=[IMAGE], sampling={"max_tokens": max_tokens})
    m = pipe.pre.process(raw)
    enc = pipe.vision.encode([(m.pixel_values, m.image_grid_thw)])[0]
    return m, enc


def refused(pipe, **change) -> str:
    m, enc = real(pipe)
    args = {"input_ids": m.input_ids, "embeds": enc.embeds, "grid": m.image_grid_thw, "hashes": enc.hashes,
            "request_json": m.request, **change}
    out, errors = submit(pipe, **args)
    assert not out and len(errors) == 1, (out, errors)
    (err,) = errors
    assert isinstance(err, InvalidArgument) and err.code == "INVALID_ARG", repr(err)
    return str(err)


def test_token_id_outside_the_vocabulary(pipe):
    m, _ = real(pipe)
    ids = m.input_ids.copy()
    ids[0] = pipe.engine.info.vocab_size + 5
    assert "input_ids" in refused(pipe, input_ids=ids) and "outside the vocabulary" in refused(pipe, input_ids=ids)
    ids[0] = -1
    assert "input_ids" in refused(pipe, input_ids=ids)


def test_embedding_rows_and_width(pipe):
    _, enc = real(pipe)
    assert "image_embeds" in refused(pipe, embeds=enc.embeds[:-3])
    assert "image_embeds" in refused(pipe, embeds=enc.embeds[:, :-1])
    bad = enc.embeds.copy()
    bad[0, 0] = np.nan
    assert "not all finite" in refused(pipe, embeds=bad)


def test_grid_that_does_not_match(pipe):
    m, _ = real(pipe)
    grid = m.image_grid_thw.copy()
    grid[0, 1] += 2
    assert "image_grid_thw" in refused(pipe, grid=grid)
    assert "image_grid_thw" in refused(pipe, grid=np.zeros((1, 2), np.int64))


@pytest.mark.parametrize("change, field", [
    ({"logprobs": 200000}, "logprobs"),
    ({"sampling": {"max_tokens": "many"}}, "max_tokens"),
    ({"sampling": {"temperature": -3.0}}, "temperature"),
    ({"sampling": {"stop_token_ids": [10**9]}}, "stop_token_ids"),
    ({"stream": "yes"}, "booleans"),
    ({"sampling": {"structured_outputs": {"kind": "python", "text": "exec()"}}}, "structured_outputs"),
])
def test_options_json_is_checked_again(pipe, change, field):
    m, _ = real(pipe)
    d = json.loads(m.request)
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    assert field in refused(pipe, request_json=json.dumps(d))


def test_options_that_are_not_json(pipe):
    assert "request" in refused(pipe, request_json=b"{not json")
    assert "request" in refused(pipe, request_json=json.dumps({"sampling": 3}))


def test_forged_embeddings_under_a_real_hash_do_not_poison_the_prefix_cache(pipe):
    """A direct call with a real image's prompt and content key but other embeddings: the next ordinary
    request with that image gets the same answer as before (its K/V was not filed under that key)."""
    before = pipe.generate([RawRequest(text_input=b"What is in the picture?", images=[IMAGE],
                                       sampling={"max_tokens": 8})])[0]
    m, enc = real(pipe)
    forged = np.random.default_rng(0).normal(size=enc.embeds.shape).astype(np.float32) * 5
    out, errors = submit(pipe, m.input_ids, forged, m.image_grid_thw, enc.hashes, m.request)
    assert not errors and out[-1].finished
    after = pipe.generate([RawRequest(text_input=b"What is in the picture?", images=[IMAGE],
                                      sampling={"max_tokens": 8})])[0]
    assert after.token_ids == before.token_ids
    assert out and sum((r.token_ids for r in out), []) != before.token_ids  # the forged call saw its own embeds


def test_bad_requests_beside_good_ones_leave_them_intact(pipe):
    """Refused direct calls sent while ordinary requests run: every ordinary one finishes, same answer."""
    raws = [RawRequest(text_input=f"Tell me about {i}".encode(), images=[IMAGE] if i % 2 else [],
                       sampling={"max_tokens": 12}) for i in range(4)]
    expected = [r.token_ids for r in pipe.generate(raws)]
    got, box = {}, {}

    def ordinary():
        got["results"] = pipe.generate(raws)

    t = threading.Thread(target=ordinary)
    t.start()
    m, enc = real(pipe)
    ids = m.input_ids.copy()
    ids[3] = 10**7
    box["a"] = submit(pipe, ids, enc.embeds, m.image_grid_thw, enc.hashes, m.request)
    d = json.loads(m.request)
    d["logprobs"] = 200000
    box["b"] = submit(pipe, m.input_ids, enc.embeds, m.image_grid_thw, enc.hashes, json.dumps(d))
    box["c"] = submit(pipe, m.input_ids, enc.embeds[:5], m.image_grid_thw, enc.hashes, m.request)
    t.join(120)
    assert all(errors for _, errors in box.values())
    assert [r.token_ids for r in got["results"]] == expected and not any(r.error for r in got["results"])
