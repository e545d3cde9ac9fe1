"""A stand-in for Triton's gRPC service, for the statuses a real tritonserver cannot be made to give
on demand (an internal error, gRPC's own message-size limit, a call-level status): it speaks the same
protocol (tritonclient's own service definition), answers live/ready, and answers ModelStreamInfer
as the user text of the request says:

- ``fake:ok``: one final response, text "ok";
- ``fake:error:MESSAGE``: an in-stream error whose error_message is MESSAGE, as Triton sends one (no
  status, the text only; a tritonvl model's starts with its tag, e.g. ``[INTERNAL] internal error``);
- ``fake:abort:CODE``: the call ends with the gRPC status CODE (``context.abort``);
- ``fake:partial:MESSAGE``: a response with text "part", then the in-stream error MESSAGE;
- ``fake:sleep:SECONDS``: a final response after SECONDS.

``max_receive_bytes`` sets the server's gRPC receive limit: a larger request is refused by gRPC
itself (RESOURCE_EXHAUSTED on the call).
"""

from __future__ import annotations

import json
import struct
import time
from concurrent import futures

import grpc
import tritonclient.grpc.service_pb2 as pb
import tritonclient.grpc.service_pb2_grpc as service


def _strings(tensor_bytes: bytes) -> list[bytes]:
    """A BYTES tensor's raw contents: each element is a 4-byte little-endian length and its bytes."""
    out, i = [], 0
    while i < len(tensor_bytes):
        (n,) = struct.unpack_from("<I", tensor_bytes, i)
        out.append(tensor_bytes[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _command(request: pb.ModelInferRequest) -> str:
    """The user's text: the last text part of ``messages``, else ``text_input``."""
    for inp, raw in zip(request.inputs, request.raw_input_contents):
        if inp.name == "messages":
            messages = json.loads(_strings(raw)[0])
            content = messages[-1]["content"]
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            return content
        if inp.name == "text_input":
            return _strings(raw)[0].decode()
    return ""


def _bytes_tensor(name: str, value: bytes) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    return (pb.ModelInferResponse.InferOutputTensor(name=name, datatype="BYTES", shape=[1, 1]),
            struct.pack("<I", len(value)) + value)


def _uint_tensor(name: str, value: int) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype="UINT32", shape=[1, 1]), struct.pack("<I", value)


def _response(model: str, text: str, final: bool = True) -> pb.ModelStreamInferResponse:
    outputs = [_bytes_tensor("text_output", text.encode())]
    if final:  # only the last response has a finish_reason and the counts (docs/INTERFACE.md)
        outputs += [_bytes_tensor("finish_reason", b"stop"), _uint_tensor("num_input_tokens", 3),
                    _uint_tensor("num_output_tokens", 1)]
    response = pb.ModelInferResponse(model_name=model, outputs=[t for t, _ in outputs],
                                     raw_output_contents=[b for _, b in outputs])
    response.parameters["triton_final_response"].bool_param = final
    return pb.ModelStreamInferResponse(infer_response=response)


class FakeTriton(service.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            command = _command(request)
            verb, _, arg = command.removeprefix("fake:").partition(":")
            if verb == "error":
                yield pb.ModelStreamInferResponse(error_message=arg)
            elif verb == "partial":
                yield _response(request.model_name, "part", final=False)
                yield pb.ModelStreamInferResponse(error_message=arg)
            elif verb == "abort":
                context.abort(getattr(grpc.StatusCode, arg), f"fake Triton aborts with {arg}")
            elif verb == "sleep":
                time.sleep(float(arg))
                yield _response(request.model_name, "slept")
            else:
                yield _response(request.model_name, "ok")


class FakeTritonServer:
    """``with FakeTritonServer() as fake: fake.url`` (gRPC HOST:PORT)."""

    def __init__(self, max_receive_bytes: int | None = None) -> None:
        options = [("grpc.max_receive_message_length", max_receive_bytes)] if max_receive_bytes else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
        service.add_GRPCInferenceServiceServicer_to_server(FakeTriton(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.url = f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeTritonServer:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None).wait()
