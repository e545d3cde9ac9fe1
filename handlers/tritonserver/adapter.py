"""The one module that touches ``triton_python_backend_utils``: tensors in, responses out.

Everything Triton-specific the model.py files need (reading inputs, config parameters, the
instance's device, building responses and mapping errors to Triton codes) lives here.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvl.client.rules.errors import InvalidArgument, RequestError, tagged, untagged
from tritonvl.handlers.devices import pick_device
from tritonvl.handlers.noise import quiet_library_noise
from tritonvl.handlers.params import read as read_params

log = logging.getLogger("tritonvl")


def enable_faulthandler() -> None:
    """A stub that dies of SIGSEGV, SIGABRT, SIGBUS, SIGFPE or SIGILL writes "Fatal Python error" and
    the Python traceback of every thread to its stderr, which tritonserver's log takes (issue 30)."""
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable(file=sys.stderr, all_threads=True)
        except Exception:  # no usable stderr: nothing to write to
            log.debug("faulthandler not enabled", exc_info=True)


_ORPHAN_POLL_S = 0.05


def exit_with_server() -> None:
    """Leave at once (os._exit: no destructor runs) when tritonserver dies without unloading us.

    The 2.51 stub notices a dead server from its health thread (every 300 ms, once the server is
    reaped) and tears itself down from that thread while its main thread still waits on the shared
    memory it unmaps: a SIGSEGV in Stub::PopMessage (seen in a core dump after SIGKILLing the
    server, and after its exit timeout passed with a client holding a stream). python_backend
    fixed that path in 2026 by exiting at once; here this thread gets there first: a re-parented
    stub (the server gone, reaped or not) exits within ``_ORPHAN_POLL_S``. The watchdog's slower
    check (watchdog.py) and its shell monitor stay as the back-ups."""
    global _ORPHAN_THREAD
    if _ORPHAN_THREAD is not None:
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(_ORPHAN_POLL_S)
            if os.getppid() != parent:
                os.write(2, f"tritonserver (pid {parent}) is gone: stub {os.getpid()} exits\n".encode())
                os._exit(1)

    _ORPHAN_THREAD = threading.Thread(target=watch, name="tritonvl-orphan-exit", daemon=True)
    _ORPHAN_THREAD.start()


_ORPHAN_THREAD: threading.Thread | None = None


def finalized() -> None:
    """The last call of every finalize(): what is left is freed by reference counts only.

    Once a stub stopped crashing on its way out (issue 30), its interpreter's exit walked the
    hundreds of thousands of objects torch and transformers make, several times over: a stop took
    17-23 s of tritonserver's 30 s exit timeout here instead of 6 (py-spy: gc_collect_main in the
    interpreter's finalization). Frozen objects are never walked by the garbage collector again;
    the model object is still released by reference counts, and what only a collection would have
    freed is left to the process' exit (the pb_utils objects were released before this call)."""
    import gc

    gc.freeze()


class ModelArgs:
    """What Triton passes to initialize(): config, typed parameters and the instance's placement.

    ``model`` names the parameter table (handlers/params.py: preprocess, vision_encoder, llm); an
    unknown key or a bad value raises ParamError here, so Triton logs it and does not load the model.
    """

    def __init__(self, args: dict, model: str) -> None:
        enable_faulthandler()  # every model's initialize() comes through here first
        quiet_library_noise()  # before the first model load imports torchao (handlers/noise.py)
        exit_with_server()
        self.config = json.loads(args["model_config"])
        raw = {k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()}
        self.params = read_params(model, raw)
        self.kind = args.get("model_instance_kind", "CPU")
        self.device_id = args.get("model_instance_device_id", "0")
        self.instance_name = args.get("model_instance_name", "")
        self.version = str(args.get("model_version", "1"))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)

    def model_dir(self) -> str:
        """`model_path` parameter, else $TRITONVL_MODEL, else the embedded tiny model."""
        path = self.params.model_path or os.environ.get("TRITONVL_MODEL", "")
        if path:
            return path
        from tritonvl.handlers.tiny_model import ensure_default_model

        return str(ensure_default_model())

    def device(self) -> str:
        p = self.params
        return pick_device(self.kind, self.device_id, self.instance_name, ",".join(map(str, p.npu_device_ids)),
                           p.device or os.environ.get("TRITONVL_DEVICE", ""))


_OPEN_METRICS: set = set()  # every TritonMetrics not closed yet (see TritonMetrics.close)


class TritonMetrics:
    """Publishes metrics.Snapshot values on Triton's metrics endpoint (prefix ``tritonvl_``), labelled
    ``model`` and ``version`` as Triton labels its own ``nv_*`` metrics."""

    def __init__(self, model: str, only: tuple[str, ...] | None = None, version: str = "1") -> None:
        from tritonvl.handlers.metrics import COUNTERS, GAUGES, HISTOGRAMS

        if only is not None:  # the metrics this model reports
            COUNTERS = {n: d for n, d in COUNTERS.items() if n in only}
            GAUGES = {n: d for n, d in GAUGES.items() if n in only}
            HISTOGRAMS = {n: d for n, d in HISTOGRAMS.items() if n in only}

        labels = self._labels = {"model": model, "version": version}
        kinds = pb_utils.MetricFamily
        # The families must outlive their metrics: keep them.
        self._families = {n: kinds(f"tritonvl_{n}_total", d, kinds.COUNTER) for n, d in COUNTERS.items()}
        self._families |= {n: kinds(f"tritonvl_{n}", d, kinds.GAUGE) for n, d in GAUGES.items()}
        self._families |= {n: kinds(f"tritonvl_{n}", d, kinds.HISTOGRAM) for n, (d, _) in HISTOGRAMS.items()}
        self._counters = {n: self._families[n].Metric(labels=labels) for n in COUNTERS}
        self._gauges = {n: self._families[n].Metric(labels=labels) for n in GAUGES}
        self._hists = {n: self._families[n].Metric(labels=labels, buckets=b) for n, (_, b) in HISTOGRAMS.items()}
        self._last: dict = {}
        self._lock = threading.Lock()  # update() (engine thread) against close() (finalize)
        self._closed = False
        _OPEN_METRICS.add(self)  # held by this module too: never freed with the model object (see close)

    def info(self, name: str, description: str, labels: dict) -> None:
        """A constant-1 gauge ``tritonvl_<name>`` whose labels carry configuration (Prometheus' info idiom)."""
        family = pb_utils.MetricFamily(f"tritonvl_{name}", description, pb_utils.MetricFamily.GAUGE)
        metric = family.Metric(labels={**self._labels, **{k: str(v) for k, v in labels.items()}})
        metric.set(1)
        self._families[name] = family
        self._gauges[name] = metric  # kept alive with its family

    def close(self) -> None:
        """Delete every metric and family now: call it from finalize(), after the threads that update
        them have stopped; later updates do nothing.

        pb_utils' Metric and MetricFamily tell the server when they are destroyed, through the stub's
        shared memory. The stub destroys the model object (and so whatever it still holds) only after
        finalize() returned and its own link to the server is gone: a family destroyed then
        dereferences a null memory pool (seen: every stop, 'segfault at 60' in
        Metric::SaveToSharedMemory, the preprocess and vision_encoder stubs; issue 30). When
        tritonserver dies without unloading (SIGKILL, or its exit timeout passed), finalize() never
        runs and the stub's own thread destroys the model object before it exits (seen in a core
        dump: ~Stub -> ~MetricFamily -> the same fault): so this module holds every TritonMetrics
        until close(), and the stub exits without ever freeing them."""
        if not self._lock.acquire(timeout=30):  # an update stuck in a call to the server: leave them be
            log.warning("metrics still in use at unload: not deleted")
            self._closed = True
            return
        try:
            self._closed = True
            self._counters, self._gauges, self._hists = {}, {}, {}
            families, self._families = self._families, {}
            while families:  # one at a time: each family deletes its metrics, then itself
                families.popitem()
        finally:
            self._lock.release()
        _OPEN_METRICS.discard(self)

    def update(self, snapshot) -> None:
        with self._lock:
            if not self._closed:
                self._update(snapshot)

    def _update(self, snapshot) -> None:
        for name, value in snapshot.counters.items():
            delta = value - self._last.get(name, 0)
            if delta > 0 and name in self._counters:
                self._counters[name].increment(delta)
            self._last[name] = value
        for name, value in snapshot.gauges.items():
            # only a change goes to Triton: each set is a round trip to the server, and an idle engine
            # must make none (a stub caught in one when tritonserver is SIGKILLed may never exit)
            if name in self._gauges and self._last.get(("gauge", name)) != value:
                self._gauges[name].set(value)
                self._last[("gauge", name)] = value
        for name, values in snapshot.observations.items():
            for v in values:
                self._hists[name].observe(v)


def watchdog(model_args: ModelArgs, on_shutdown=None):
    """Start the stub watchdog: exits when tritonserver is gone, calls ``on_shutdown`` when it starts
    stopping, and (parameter `exit_on_stub_failure`, default true) stops it when a sibling stub dies."""
    from tritonvl.handlers.tritonserver.watchdog import Watchdog

    return Watchdog(model_args.instance_name or model_args.config.get("name", "model"),
                    check_siblings=model_args.params.exit_on_stub_failure, on_shutdown=on_shutdown)


def error(exc: Exception) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=triton_error(exc))


def triton_error(exc: Exception):
    """Triton's code, and the status tag at the front of the message (client.rules.errors.tagged):
    in-stream errors reach clients as text only."""
    if isinstance(exc, RequestError):
        code = getattr(pb_utils.TritonError, exc.code, pb_utils.TritonError.INTERNAL)
        return pb_utils.TritonError(tagged(exc.status, str(exc)), code)
    log.error("internal error: %r", exc)
    return pb_utils.TritonError(tagged("INTERNAL", f"internal error: {type(exc).__name__}: {exc}"),
                                pb_utils.TritonError.INTERNAL)


def tensor(request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def required(request, name: str) -> np.ndarray:
    arr = tensor(request, name)
    if arr is None:
        raise InvalidArgument(f"input {name!r} is required")
    return arr


def first(request, name: str) -> np.ndarray | None:
    """An input without its batch dimension (None when absent)."""
    arr = tensor(request, name)
    return None if arr is None else arr[0]


def scalar(request, name: str):
    arr = tensor(request, name)
    if arr is None or arr.size == 0:
        return None
    value = arr.reshape(-1)[0]
    return value.item() if hasattr(value, "item") and arr.dtype != np.object_ else value


def string_list(request, name: str) -> list:
    arr = tensor(request, name)
    return [] if arr is None else list(arr.reshape(-1))


class Inputs:
    """One request's input tensors, read by name (batch dim included): what the handlers' readers take
    (``preprocess.preprocessor.raw_request``)."""

    def __init__(self, request) -> None:
        self.request = request

    def array(self, name: str) -> np.ndarray | None:
        return tensor(self.request, name)

    def scalar(self, name: str):
        return scalar(self.request, name)

    def strings(self, name: str) -> list:
        return string_list(self.request, name)


def response(outputs: dict[str, np.ndarray], wanted: frozenset | None = None) -> pb_utils.InferenceResponse:
    """Add the batch dimension and wrap numpy outputs (only those in ``wanted``, when given)."""
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, np.expand_dims(value, 0)) for name, value in outputs.items()
                        if wanted is None or name in wanted])


def requested_outputs(request) -> frozenset | None:
    """The output names the request asked for (Triton fills in all of them when a client names none);
    None when the request cannot tell.

    A decoupled model must send only these: the 2.51 stub drops the others from the response inside
    ResponseSender.send, with the GIL released, so a tensor only the response held is destroyed, and
    its numpy array freed, without the GIL (python_backend fixed it in r24.12; issue 30)."""
    names = getattr(request, "requested_output_names", None)
    if names is None:
        return None
    try:
        return frozenset(names())
    except Exception:
        return None


class StreamSender:
    """Responses of one decoupled request. ``send``/``send_error`` only enqueue on the model's
    ResponsePump (handlers/tritonserver/pump.py), so the engine thread never waits on response IPC.
    ``send`` takes a record (``.finished``, ``.merged()``: engine.outputs.SeqOutput); ``encode`` turns
    it into the output tensors when it goes out."""

    _pump = None

    def __init__(self, request, encode) -> None:
        from tritonvl.handlers.tritonserver.pump import ResponsePump

        if StreamSender._pump is None:
            StreamSender._pump = ResponsePump()
        self.sender = request.get_response_sender()
        self.request = request
        self.encode = encode
        self.wanted = requested_outputs(request)

    def send(self, record) -> None:
        self._pump.data(self, self._send_now, record)

    def send_error(self, exc: Exception) -> None:
        self._pump.error(self, self._send_error_now, exc)

    @classmethod
    def flush(cls) -> None:
        if cls._pump is not None:
            cls._pump.flush()

    @classmethod
    def close(cls) -> None:
        """finalize(): send what is queued, end the pump's thread and let go of the senders it holds
        while the stub can still talk to the server."""
        pump, cls._pump = cls._pump, None
        if pump is not None and not pump.stop():
            log.warning("the response pump did not stop in time")

    def _send_now(self, record) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if record.finished else 0
        self.sender.send(response(self.encode(record), self.wanted), flags=flags)

    def _send_error_now(self, exc: Exception) -> None:
        self.sender.send(error(exc), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self) -> bool:
        """Cancelled by the client (checked on the response sender, else on the request)."""
        for probe in (getattr(self.sender, "is_cancelled", None), self.request.is_cancelled):
            if probe is None:
                continue
            try:
                return bool(probe())
            except Exception as exc:  # older backends: no cancellation on this object
                if not getattr(StreamSender, "_warned", False):
                    StreamSender._warned = True
                    log.warning("cancellation check failed: %r", exc)
        return False


# ---- BLS: the public front calls preprocess, vision_encoder and llm (handlers/tritonserver/front.py) ----

def _bls_error(err) -> RequestError:
    """A child's error as a RequestError with the child's code (INTERNAL when it has none of ours)
    and the status of its tag (its code when Triton made it: no tag), the tag taken off."""
    code = "INTERNAL"
    for name in ("INVALID_ARG", "UNAVAILABLE", "CANCELLED"):
        if getattr(pb_utils.TritonError, name, None) == err.code():
            code = name
    status, message = untagged(err.message())
    return RequestError(message, code, status)


def bls_call(model: str, inputs: list, outputs: list[str]) -> dict:
    """One request to a non-decoupled model: its output tensors by name."""
    resp = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs).exec()
    if resp.has_error():
        raise _bls_error(resp.error())
    return {t.name(): t for t in resp.output_tensors()}


class _Keeper:
    """Keeps objects alive for ``hold_s`` seconds, then lets them go in a Python thread (the next
    ``keep`` call, or ``release``) with the GIL held.

    Why (issue 30): a BLS response iterator owns every response of its stream, and each response's
    tensors own numpy arrays. On the last response the 2.51 stub queues a clean-up that drops its own
    reference to the iterator from a C++ thread that does not hold the GIL. When Python let go of the
    iterator first, that thread destroys it, freeing the numpy arrays (and their bytes objects)
    without the GIL, beside Python threads that allocate: heap corruption, a stub dead later
    ('segfault at 1 ... in libpython3.11'). Seen with a probe of the holder's count: after 2 of 80
    streams the stub still held the iterator when the front was done with it, for about 1 ms; under
    scripts/stress.py without this hold the front stub died within 5 minutes (heap corruption while
    copying a stream's tensors), with it none did in 30. python_backend r25.01 takes the GIL in
    ~PbTensor; 2.51 does not."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def keep(self, *objects) -> None:
        now = time.monotonic()
        with self._lock:
            self._items.append((now + self.hold_s, objects))
            due = []
            while self._items and self._items[0][0] <= now:
                due.append(self._items.popleft())
        del due  # here, with the GIL, outside the lock

    def release(self) -> None:
        """Let go of everything now (finalize(): the stub dropped its own references before calling it)."""
        with self._lock:
            items, self._items = self._items, collections.deque()
        del items

    def __len__(self) -> int:
        return len(self._items)


_STREAMS = _Keeper(hold_s=5.0)  # the stub's clean-up comes about 1 ms after the last response


def bls_stream(model: str, inputs: list, outputs: list[str], key: str = ""):
    """The responses of a decoupled model as dicts of output tensors (empty responses skipped)."""
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs,
                                        request_id=key)
    responses = request.exec(decoupled=True)
    try:
        for resp in responses:
            if resp.has_error():
                raise _bls_error(resp.error())
            tensors = resp.output_tensors()
            if tensors:  # copied: the front sends them on after this response object is gone
                yield {t.name(): pb_utils.Tensor(t.name(), np.array(t.as_numpy(), copy=True)) for t in tensors}
    finally:
        _STREAMS.keep(responses, request)  # never the last to let go in a stub thread without the GIL


def bls_stop(model: str, key: str) -> None:
    """Ask a decoupled model to end its request ``key`` (input ``stop``, TensorRT-LLM's pattern)."""
    stop = pb_utils.Tensor("stop", np.array([[True]]))
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=[], inputs=[stop], request_id=key)
    responses = request.exec(decoupled=True)
    try:
        for resp in responses:
            if resp.has_error():
                log.warning("stop of %s failed: %s", key, resp.error().message())
    finally:
        _STREAMS.keep(responses, request)


def release_bls() -> None:
    """finalize(): let go of the finished BLS streams still kept (see _Keeper)."""
    _STREAMS.release()


def send_final(request) -> None:
    """End a decoupled request with a flag-only final response (the answer to a stop)."""
    request.get_response_sender().send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class FrontRequest:
    """The front's view of one of its own requests: its inputs, its responses, its cancellation."""

    def __init__(self, request) -> None:
        self.request = request
        self.sender = request.get_response_sender()
        self.wanted = requested_outputs(request)  # only these go out (see requested_outputs)
        # Copied inside execute(): the front's thread uses them after execute() returned, and a
        # request's input buffers are not ours to keep past it.
        self._inputs = [pb_utils.Tensor(t.name(), np.array(t.as_numpy(), copy=True)) for t in request.inputs()]

    def inputs(self) -> list:
        return self._inputs

    def send(self, tensors: dict, final: bool) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        out = [t for name, t in tensors.items() if self.wanted is None or name in self.wanted]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=out), flags=flags)

    def send_error(self, exc: Exception) -> None:
        self.sender.send(error(exc), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())

