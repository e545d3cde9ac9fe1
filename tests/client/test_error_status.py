"""The client transports make errors from statuses, not words: the gRPC call's status, the HTTP
status, or the tag a tritonvl model puts at the start of every error message (all Triton passes on
for an error inside a stream). No server: the errors are built as tritonclient and grpc build them."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from tritonvl.client.errors import (
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    RequestFailed,
    RequestTimeout,
    RequestTooLarge,
    ServerOverloaded,
    ServerUnavailable,
    ServiceUnavailable,
)
from tritonvl.client.grpc_transport import stream_error
from tritonvl.client.http_transport import parse_body, sse_event
from tritonvl.client.rules.errors import DeadlineExceeded, Overloaded, RequestError, tagged, untagged

URL = "localhost:8001"

# (error_message of the stream, class, message the caller sees)
IN_STREAM = [
    ("[INVALID_ARG] messages[0].role: 'shutting down' is not one of ('system', 'user', 'assistant')",
     InvalidRequest, "messages[0].role: 'shutting down' is not one of ('system', 'user', 'assistant')"),
    ("[INVALID_ARG] mm_processor_kwargs: unknown key 'server overloaded'", InvalidRequest, None),
    ("[INVALID_ARG] text: 'deadline exceeded'", InvalidRequest, None),
    ("[INVALID_ARG] [DEADLINE_EXCEEDED] echoed user text at the very start", InvalidRequest,
     "[DEADLINE_EXCEEDED] echoed user text at the very start"),
    ("[RESOURCE_EXHAUSTED] server overloaded: the waiting queue is full, retry later", ServerOverloaded, None),
    ("[DEADLINE_EXCEEDED] request exceeded the 4-second deadline (llm parameter request_deadline_s)",
     RequestTimeout, None),
    ("[UNAVAILABLE] the server is shutting down", ServiceUnavailable, "the server is shutting down"),
    ("[INTERNAL] internal error: RuntimeError: boom", RequestFailed, None),
    ("[NOT_FOUND] no such thing", ModelNotFound, None),
    ("in ensemble 'qwen2_5_vl_ensemble', [DEADLINE_EXCEEDED] request exceeded", RequestTimeout,
     "request exceeded"),
    # untagged: Triton's own errors
    ("Request for unknown model: 'nosuch' is not found", ModelNotFound, None),
    ("Request for unknown model: 'qwen2_5_vl' has no available versions", ModelNotReady, None),
    ("Stub process 'qwen2_5_vl_0_0' is not healthy.", RequestFailed, None),
    ("server overloaded (no tag: not ours, and words decide nothing)", RequestFailed, None),
    ("the server is shutting down", RequestFailed, None),
    ("Deadline Exceeded", RequestFailed, None),
]


@pytest.mark.parametrize("message,kind,shown", IN_STREAM, ids=[m[:50] for m, _, _ in IN_STREAM])
def test_in_stream_error_by_tag(message, kind, shown):
    err = stream_error(InferenceServerException(msg=message), URL)  # as tritonclient makes one: no status
    assert type(err) is kind, (message, err)
    if shown is not None:
        assert str(err) == shown
    assert not str(err).startswith("in ensemble")


class _RpcError(grpc.RpcError):
    """What a grpc.aio call raises: a status and its details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


CALL = [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", ServerUnavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", RequestTimeout),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)", RequestTooLarge),
    (grpc.StatusCode.INVALID_ARGUMENT, "bad", InvalidRequest),
    (grpc.StatusCode.NOT_FOUND, "no model", ModelNotFound),
    (grpc.StatusCode.INTERNAL, "shutting down (words decide nothing)", RequestFailed),
    (grpc.StatusCode.UNIMPLEMENTED, "no", RequestFailed),
]


@pytest.mark.parametrize("code,details,kind", CALL, ids=[c[0].name for c in CALL])
def test_call_status(code, details, kind):
    assert type(stream_error(_RpcError(code, details), URL)) is kind  # grpc.aio
    sync = InferenceServerException(msg=details, status=str(code))  # tritonclient.grpc's get_error_grpc
    assert type(stream_error(sync, URL)) is kind


def test_a_tag_wins_over_the_call_status():
    """Triton puts a model's error on a unary call's status with its own code (UNAVAILABLE for a
    deadline): the tag, which only a tritonvl model writes, says more."""
    err = stream_error(_RpcError(grpc.StatusCode.UNAVAILABLE, "[DEADLINE_EXCEEDED] request exceeded"), URL)
    assert type(err) is RequestTimeout and str(err) == "request exceeded"
    err = stream_error(InferenceServerException(msg="[INVALID_ARG] x", status="StatusCode.INTERNAL"), URL)
    assert type(err) is InvalidRequest


# HTTP: Triton 2.51's /generate answers every model error with 400; /generate_stream's error event
# comes after a 200; Triton's own errors carry its status.
HTTP = [
    (400, b'{"error":"[UNAVAILABLE] the server is shutting down"}', ServiceUnavailable),
    (400, b'{"error":"[RESOURCE_EXHAUSTED] server overloaded: the waiting queue is full"}', ServerOverloaded),
    (400, b'{"error":"[DEADLINE_EXCEEDED] request exceeded the 4-second deadline"}', RequestTimeout),
    (400, b'{"error":"[INVALID_ARG] messages[0].role: \'server overloaded\' is not one of"}', InvalidRequest),
    (400, b'{"error":"[INTERNAL] internal error: RuntimeError: boom"}', RequestFailed),
    (404, b'{"error":"Request for unknown model: \'nosuch\' is not found"}', ModelNotFound),
    (413, b'{"error":"request too large"}', RequestTooLarge),
    (500, b'{"error":"failed to parse the request JSON buffer"}', RequestFailed),
    (503, b'{"error":"Server is shutting down"}', ServiceUnavailable),
]


@pytest.mark.parametrize("status,body,kind", HTTP, ids=[f"{s}-{b[10:40].decode()}" for s, b, _ in HTTP])
def test_http_status(status, body, kind):
    with pytest.raises(kind) as info:
        parse_body(body, status)
    assert type(info.value) is kind and not str(info.value).startswith("[")


def test_sse_error_event_by_tag():
    with pytest.raises(RequestTimeout):
        sse_event(b'data: {"error":"[DEADLINE_EXCEEDED] request exceeded the deadline"}')
    with pytest.raises(RequestFailed) as info:
        sse_event(b'data: {"error":"deadline exceeded, but untagged"}')
    assert type(info.value) is RequestFailed


def test_tags_roundtrip_and_are_never_forged():
    assert untagged(tagged("UNAVAILABLE", "x")) == ("UNAVAILABLE", "x")
    # a message that begins with user text shaped like a tag still gets its own tag first
    assert untagged(tagged("INVALID_ARG", "[DEADLINE_EXCEEDED] y")) == ("INVALID_ARG", "[DEADLINE_EXCEEDED] y")
    assert untagged("[BOGUS] z") == (None, "[BOGUS] z") and untagged("[request id: 7] z")[0] is None
    assert Overloaded("o").status == "RESOURCE_EXHAUSTED" and Overloaded("o").code == "UNAVAILABLE"
    assert DeadlineExceeded("d").status == "DEADLINE_EXCEEDED" and DeadlineExceeded("d").code == "UNAVAILABLE"
    assert RequestError("e", "UNAVAILABLE").status == "UNAVAILABLE" and RequestError("e").status == "INVALID_ARG"
