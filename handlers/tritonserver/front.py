"""The public model's logic: preprocess -> vision_encoder -> llm through BLS, with cancellation.

Triton's ensemble never passes a client's cancel to its running decoupled `llm` step, and on 24.10
a BLS caller cannot cancel its child either. So the front keeps the ensemble's interface and steps
(preprocess and vision_encoder keep their dynamic batching and instance groups), streams `llm`'s
responses to its own client, and when its client cancels (gRPC stream cancel, closed HTTP SSE
connection), sends `llm` an explicit stop for that request's key: the engine drops the sequence
at its next step and frees its KV blocks (docs/CANCELLATION.md).

Each request runs in its own thread (a BLS call blocks); one watcher thread polls the requests
streaming from `llm` for cancellation. Tensors go through as Triton tensors, never copied here.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from tritonvl.client.rules.errors import Overloaded, Unavailable

log = logging.getLogger("tritonvl.front")

PREPROCESS_OUTPUTS = ["input_ids", "pixel_values", "image_grid_thw", "request", "pixel_seal", "request_seal",
                      "media_sizes"]
VISION_OUTPUTS = ["image_embeds", "image_hashes", "embeds_seal"]
LLM_OUTPUTS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "num_image_tokens",
               "output_ids", "logprobs", "media_sizes"]


class PublicRequest(Protocol):
    """One request to the public model, as the front sees it (adapter.FrontRequest)."""

    def inputs(self) -> list: ...
    def send(self, tensors: dict, final: bool) -> None: ...
    def send_error(self, exc: Exception) -> None: ...
    def is_cancelled(self) -> bool: ...


@dataclass
class ModelCalls:
    """How the front reaches the other models (adapter.bls_call / bls_stream / bls_stop)."""

    call: Callable[[str, list, list[str]], dict]
    stream: Callable[[str, list, list[str], str], Iterator[dict]]
    stop: Callable[[str, str], None]


class Front:
    def __init__(self, calls: ModelCalls, poll_seconds: float = 0.05, outputs: list[str] | None = None,
                 max_inflight: int = 1088) -> None:
        self.calls = calls
        self.max_inflight, self.inflight = max_inflight, 0  # requests with a thread of their own
        self.outputs = outputs or LLM_OUTPUTS
        self.poll = poll_seconds
        self.streaming: dict[str, PublicRequest] = {}  # key -> client, while llm streams for it
        self.stopped: set[str] = set()
        self.ended: set[str] = set()  # ended by the drain deadline: nothing more is sent for them
        self.closing = False
        self._drain_timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="tritonvl-front-cancel", daemon=True)
        self._watcher.start()

    def submit(self, client: PublicRequest) -> None:
        """Serve a request in a thread of its own; past ``max_inflight`` of them it is refused at once
        (a flood of requests cannot make the stub start threads without bound)."""
        with self._lock:
            admitted = self.inflight < self.max_inflight
            self.inflight += admitted
        if not admitted:
            client.send_error(Overloaded(f"server overloaded: {self.max_inflight} requests in flight (qwen2_5_vl "
                                         "parameter max_inflight_requests), retry later"))
            return
        threading.Thread(target=self._serve_counted, args=(client,), name="tritonvl-front", daemon=True).start()

    def _serve_counted(self, client: PublicRequest) -> None:
        try:
            self.serve(client)
        finally:
            with self._lock:
                self.inflight -= 1

    def begin_drain(self, deadline_s: float | None = None) -> None:
        """The server is stopping: refuse new requests (llm drains the ones in flight). After
        ``deadline_s``, requests still streaming end with an error: an llm that cannot answer any more
        (its stub died) would otherwise hold them, and Triton's exit with them, forever."""
        self.closing = True
        if deadline_s is not None and self._drain_timer is None:
            self._drain_timer = timer = threading.Timer(deadline_s, self.end_all)
            timer.daemon = True
            timer.start()

    def end_drain(self) -> None:
        """The drain was begun by mistake (the server answers again): take new requests again and call
        off the deadline. Requests refused meanwhile got UNAVAILABLE, which clients may retry."""
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None:
            timer.cancel()
        self.closing = False

    def end_all(self) -> None:
        """End every request still streaming with a final error (drain deadline passed, or unload)."""
        with self._lock:
            left = list(self.streaming.items())
            self.streaming.clear()  # the watcher and serve() lose sight of them (see _finish)
            self.ended.update(key for key, _ in left)
            for key, client in left:
                try:
                    client.send_error(Unavailable("the server is shutting down (front drain_deadline_s passed)"))
                except Exception:
                    log.debug("could not end %s", key, exc_info=True)

    def serve(self, client: PublicRequest) -> None:
        key = uuid.uuid4().hex
        try:
            if self.closing:
                raise Unavailable("the server is shutting down")
            pre = self.calls.call("preprocess", client.inputs(), PREPROCESS_OUTPUTS)
            vis = self.calls.call("vision_encoder", [pre["pixel_values"], pre["image_grid_thw"], pre["pixel_seal"]],
                                  VISION_OUTPUTS)
            with self._lock:
                self.streaming[key] = client
            # media_sizes: llm hands it back with its first response (the ensemble's way too)
            inputs = [pre["input_ids"], vis["image_embeds"], pre["image_grid_thw"], vis["image_hashes"], pre["request"],
                      pre["request_seal"], vis["embeds_seal"], pre["media_sizes"]]
            final = gone = False
            for out in self.calls.stream("llm", inputs, self.outputs, key):  # read to its end, always
                final = "finish_reason" in out  # only the last response carries it (docs/INTERFACE.md)
                if gone:
                    continue
                try:
                    if final:
                        self._finish(key, client.send, out, True)
                    else:
                        with self._lock:  # not after _end_all's final response
                            if key not in self.ended:
                                client.send(out, False)
                except Exception:  # the client went away: stop the generation
                    log.debug("sending to %s failed", key, exc_info=True)
                    gone = True
                    self._stop(key)
            if not final and not gone:
                raise Unavailable("the llm step ended without a final response")
        except Exception as exc:
            try:
                self._finish(key, client.send_error, exc)
            except Exception:  # the client is gone
                log.debug("could not send the error of %s", key, exc_info=True)
        finally:
            with self._lock:
                self.streaming.pop(key, None)
                self.stopped.discard(key)
                self.ended.discard(key)

    def _finish(self, key: str, send_final: Callable, *args) -> None:
        """Send the final response under the lock, after the watcher lost sight of the request:
        Triton frees a request's response factory with its final response, and asking a freed
        one whether it is cancelled crashes tritonserver (seen: SIGSEGV in
        TRITONBACKEND_ResponseFactoryIsCancelled)."""
        with self._lock:
            self.streaming.pop(key, None)
            if key not in self.ended:
                send_final(*args)

    def _stop(self, key: str) -> None:
        with self._lock:
            if key in self.stopped:
                return
            self.stopped.add(key)
        try:
            self.calls.stop("llm", key)
        except Exception:
            log.exception("stopping request %s failed", key)

    def close(self, timeout: float = 10.0) -> bool:
        """Unload (after end_all): stop the cancel watcher and the drain timer, and wait up to
        ``timeout`` for the request threads to end, so that no thread of ours still holds or calls a
        Triton object once finalize() returned (issue 30). True when all of them ended."""
        self._closed.set()
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None:
            timer.cancel()
        deadline = time.monotonic() + timeout
        self._watcher.join(max(0.0, deadline - time.monotonic()))
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.inflight and not self._watcher.is_alive()

    def _watch(self) -> None:
        while not self._closed.wait(self.poll):
            with self._lock:  # no final response goes out meanwhile (see _finish)
                cancelled = [k for k, c in self.streaming.items() if k not in self.stopped and c.is_cancelled()]
            for key in cancelled:
                self._stop(key)
