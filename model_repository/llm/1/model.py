"""llm (decoupled): input_ids, image_embeds, image_grid_thw, image_hashes, request ->
text_output, finish_reason, num_input_tokens, num_output_tokens, output_ids.

execute() only enqueues; the backend's thread owns the device and sends the responses: one per
text delta when streaming, else exactly one; the last one carries the FINAL flag. A request with
``stop`` true ends the request whose id it carries (the public front's cancel, handlers/llm/stops.py).
"""

from tritonvl.handlers.llm.backend import make_backend
from tritonvl.handlers.llm.stops import StopRegistry
from tritonvl.handlers.llm.tensors import INPUTS, job_from_tensors, output_tensors
from tritonvl.handlers.tritonserver import adapter as ta


class TritonPythonModel:
    def initialize(self, args):
        cfg = ta.ModelArgs(args, "llm")
        self.drain_s = cfg.params.drain_deadline_s
        self.backend = None
        self.watchdog = ta.watchdog(cfg, on_shutdown=self.drain)
        self.stops = StopRegistry()
        self.backend = make_backend(cfg, ta.TritonMetrics("llm", version=cfg.version))

    def drain(self):
        begin = getattr(self.backend, "begin_drain", None)  # the engine; generate() just ends at exit
        if begin is not None:
            begin(self.drain_s)

    def execute(self, requests):
        self.watchdog.serving()
        for request in requests:
            key = request.request_id()
            if ta.scalar(request, "stop"):
                self.stops.stop(key)
                ta.send_final(request)
                continue
            sender = ta.StreamSender(request, output_tensors)
            try:
                job = job_from_tensors([ta.required(request, n)[0] for n in INPUTS],
                    ta.scalar(request, "request"), sender.send, sender.send_error,
                    lambda k=key, s=sender: self.stops.stopped(k) or s.is_cancelled())
                self.backend.submit(job)
            except Exception as exc:
                sender.send_error(exc)
        return None

    def finalize(self):
        self.watchdog.stop()
        self.backend.stop()
        ta.StreamSender.flush()  # the last responses (drained or failed requests) go out
