"""Triton's failures reach OpenAI clients by status, never by their words: the mapping table, through
the real gateway process and the official openai SDK.

The rows a real tritonserver can be made to give (its engine's deadline and full queue, INVALID_ARG
with user text that holds the words the old guessing keyed on, an unknown model, its gRPC deadline)
run against one with small limits; the rest (an internal error, gRPC's own size limit, call-level
statuses) against tests/gateway/fake_triton.py, which speaks Triton's gRPC protocol.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import openai
import pytest
import requests
from fake_triton import FakeTritonServer

from tritonvl.handlers.gateway.process import GatewayProcess
from tritonvl.handlers.tools.launcher import ServerProcess, free_port

CHAT = "/v1/chat/completions"
DEADLINE_S = 4  # the engine's request_deadline_s on the limited server (4000 tokens take longer)


def sdk(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)


def refused(gw: GatewayProcess, stream: bool = False, **body) -> openai.APIStatusError:
    """The SDK's error for a chat request the gateway refuses."""
    body = {"model": "qwen2_5_vl", "max_tokens": 4, **body}
    with pytest.raises(openai.APIStatusError) as info:
        out = sdk(gw).chat.completions.create(stream=stream, **body)
        if stream:
            list(out)
    return info.value


def said(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- a real tritonserver with small limits --------------------------------------------------------

@pytest.fixture(scope="module")
def limited(model_dir, tmp_path_factory):
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")
    logs = tmp_path_factory.mktemp("status")
    limits = {"llm": {"max_num_seqs": "1", "max_waiting": "1", "request_deadline_s": str(DEADLINE_S)}}
    with ServerProcess(str(model_dir), overrides=limits, log_path=str(logs / "tritonserver.log")) as srv:
        with GatewayProcess(srv.grpc_url, free_port(), log_path=str(logs / "gateway.log")) as gw:
            gw.server = srv
            yield gw
            assert gw.proc.poll() is None, "the gateway died during the tests"


# user text holding the words the gateway used to map to 429 / 503 / 504: each is Triton's INVALID_ARG
TRIGGERS = [
    ("'shutting down' as a role", {"messages": [{"role": "shutting down", "content": "hi"}]}, "shutting down"),
    ("'server overloaded' as a JSON key", {"messages": said("hi"), "extra_body": {
        "mm_processor_kwargs": {"server overloaded": 1}}}, "server overloaded"),
    ("'deadline exceeded' in a prompt's schema", {"messages": said("deadline exceeded"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "deadline exceeded"}}}},
     "deadline exceeded"),
    ("'queue is full' as a part type", {"messages": [{"role": "user", "content": [
        {"type": "queue is full", "text": "x"}]}]}, "queue is full"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("name,body,words", TRIGGERS, ids=[t[0] for t in TRIGGERS])
def test_user_text_with_trigger_words_stays_400(limited, name, body, words, stream):
    err = refused(limited, stream=stream, **body)
    assert isinstance(err, openai.BadRequestError), (err.status_code, err.body)
    assert words in err.body["message"], err.body  # the words are there: the status did not come from them
    assert err.body["type"] == "invalid_request_error"


def test_engine_deadline_is_504(limited):
    """llm's request_deadline_s ends a long generation: DEADLINE_EXCEEDED, 504 (was 400 by its text)."""
    start = time.monotonic()
    err = refused(limited, messages=said("go on"), max_tokens=4000, extra_body={"ignore_eos": True})
    assert err.status_code == 504 and err.body["code"] == "timeout", err.body
    assert "request_deadline_s" in err.body["message"]
    assert DEADLINE_S - 1 < time.monotonic() - start < DEADLINE_S + 30


def test_gateway_timeout_is_504(limited, tmp_path):
    """The gateway's own --timeout (the gRPC deadline): the call's DEADLINE_EXCEEDED, 504."""
    with GatewayProcess(limited.server.grpc_url, free_port(), args=["--timeout", "1"],
                        log_path=str(tmp_path / "gw.log")) as gw:
        err = refused(gw, messages=said("go on"), max_tokens=4000, extra_body={"ignore_eos": True})
        assert err.status_code == 504 and err.body["code"] == "timeout", err.body


def test_full_engine_queue_is_429(limited):
    """1 running + 1 waiting is all the engine takes: the rest are RESOURCE_EXHAUSTED, 429 at once."""
    results: list = [None] * 6

    def one(i: int) -> None:
        start = time.monotonic()
        try:
            sdk(limited).chat.completions.create(model="qwen2_5_vl", messages=said(f"busy {i}"), max_tokens=40,
                                                 extra_body={"ignore_eos": True})
            results[i] = (200, time.monotonic() - start, None)
        except openai.APIStatusError as exc:
            results[i] = (exc.status_code, time.monotonic() - start, exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r[0] for r in results)
    assert 429 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 429}, [(r[0], r[2] and r[2].body) for r in results]
    for status, elapsed, exc in results:
        if status == 429:
            assert isinstance(exc, openai.RateLimitError) and exc.body["code"] == "overloaded", exc.body
            assert "overloaded" in exc.body["message"] and elapsed < DEADLINE_S


def test_unknown_triton_model_is_404(limited, tmp_path):
    with GatewayProcess(limited.server.grpc_url, free_port(), args=["--triton-model", "nosuch"],
                        log_path=str(tmp_path / "gw.log")) as gw:
        err = refused(gw, messages=said("hi"))
        assert isinstance(err, openai.NotFoundError) and err.body["code"] == "model_not_found", err.body


# ---- the fake Triton: rows a real server cannot be made to give -----------------------------------

@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    logs = tmp_path_factory.mktemp("fake")
    with FakeTritonServer(max_receive_bytes=256 * 1024) as triton:
        with GatewayProcess(triton.url, free_port(), log_path=str(logs / "gateway.log")) as gw:
            yield gw


# (what the fake says, HTTP status, openai SDK class, code)
FAKE = [
    ("fake:error:[INVALID_ARG] messages[0].role: 'x' is not one of ...", 400, openai.BadRequestError, None),
    ("fake:error:[NOT_FOUND] no such thing", 404, openai.NotFoundError, "model_not_found"),
    ("fake:error:[RESOURCE_EXHAUSTED] server overloaded: the waiting queue is full, retry later", 429,
     openai.RateLimitError, "overloaded"),
    ("fake:error:[UNAVAILABLE] the server is shutting down", 503, openai.InternalServerError, "triton_unavailable"),
    ("fake:error:[DEADLINE_EXCEEDED] request exceeded the 4-second deadline", 504, openai.InternalServerError,
     "timeout"),
    ("fake:error:[INTERNAL] internal error: RuntimeError: device lost", 500, openai.InternalServerError,
     "internal_error"),
    # a tag is read at the start only: one inside the text (echoed user text) changes nothing
    ("fake:error:[INVALID_ARG] stop: '[DEADLINE_EXCEEDED] x' is too long", 400, openai.BadRequestError, None),
    # Triton's own in-stream errors carry no tag: its unknown-model message, and anything else (500)
    ("fake:error:Request for unknown model: 'qwen2_5_vl' is not found", 404, openai.NotFoundError,
     "model_not_found"),
    ("fake:error:Stub process 'qwen2_5_vl_0_0' is not healthy.", 500, openai.InternalServerError, "internal_error"),
    # call-level gRPC statuses
    ("fake:abort:INVALID_ARGUMENT", 400, openai.BadRequestError, None),
    ("fake:abort:NOT_FOUND", 404, openai.NotFoundError, "model_not_found"),
    ("fake:abort:UNAVAILABLE", 503, openai.InternalServerError, "triton_unavailable"),
    ("fake:abort:DEADLINE_EXCEEDED", 504, openai.InternalServerError, "timeout"),
    ("fake:abort:INTERNAL", 500, openai.InternalServerError, "internal_error"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("says,status,kind,code", FAKE, ids=[f[0][:48] for f in FAKE])
def test_status_table(fake, says, status, kind, code, stream):
    err = refused(fake, stream=stream, messages=said(says))
    assert err.status_code == status and isinstance(err, kind), (err.status_code, err.body)
    assert set(err.body) == {"message", "type", "param", "code"} and err.body["code"] == code, err.body
    assert not err.body["message"].startswith("["), err.body  # the tag is not shown to the client


def test_grpc_message_too_large_is_413(fake):
    """gRPC's own limit on a message (the fake takes 256 KiB): RESOURCE_EXHAUSTED on the call, 413."""
    err = refused(fake, messages=said("fake:ok " + "x" * 300_000))
    assert err.status_code == 413 and err.body["code"] == "request_too_large", err.body
    assert sdk(fake).chat.completions.create(model="qwen2_5_vl", messages=said("fake:ok"), max_tokens=2).choices[0] \
        .message.content == "ok"


def test_error_after_the_first_response_is_an_error_event(fake):
    """Once the status line is out (200), a failure is an {"error": ...} event in OpenAI's shape, which
    the SDK raises; its code comes from the status too."""
    r = requests.post(fake.url + CHAT, json={"messages": said("fake:partial:[DEADLINE_EXCEEDED] too late"),
                                            "stream": True}, stream=True, timeout=30)
    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    assert r.status_code == 200 and events[1]["choices"][0]["delta"]["content"] == "part", events
    assert events[-1] == {"error": {"message": "too late", "type": "timeout", "param": None, "code": "timeout"}}
    with pytest.raises(openai.APIError, match="boom"):
        list(sdk(fake).chat.completions.create(model="qwen2_5_vl", messages=said("fake:partial:[INTERNAL] boom"),
                                               stream=True))
