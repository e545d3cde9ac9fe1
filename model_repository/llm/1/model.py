"""llm (decoupled): input_ids, image_embeds, image_grid_thw, image_hashes, request, request_seal,
embeds_seal (+ media_sizes, handed back) -> text_output, finish_reason, num_input_tokens,
num_output_tokens, num_image_tokens, output_ids, logprobs, media_sizes (first response). Only inputs
this server's pipeline sealed are taken (handlers/seals.py).

execute() only enqueues; the backend's thread owns the device and sends the responses: one per
text delta when streaming, else exactly one; the last one carries the FINAL flag. A request with
``stop`` true ends the request whose id it carries (the public front's cancel, handlers/llm/stops.py).
"""

from tritonvl.handlers.llm.backend import make_backend
from tritonvl.handlers.llm.stops import StopRegistry
from tritonvl.handlers.llm.tensors import INPUTS, SEALS, check_seals, encoder, job_from_tensors
from tritonvl.handlers.seals import Sealer, load_key
from tritonvl.handlers.tritonserver import adapter


class TritonPythonModel:
    def initialize(self, args):
        model_args = adapter.ModelArgs(args, "llm")
        self.drain_s = model_args.params.drain_deadline_s
        self.backend = None
        self.watchdog = adapter.watchdog(model_args, on_shutdown=self.drain)
        self.watchdog.on_resume.append(self.resume)
        self.stops = StopRegistry()
        self.seals = Sealer(load_key(), enforce=model_args.params.internal_inputs == "sealed")
        self.metrics = adapter.TritonMetrics("llm", version=model_args.version)
        self.backend = make_backend(model_args, self.metrics)

    def drain(self):
        begin = getattr(self.backend, "begin_drain", None)  # the engine; generate() just ends at exit
        if begin is not None:
            begin(self.drain_s)

    def resume(self):  # the watchdog took a mistaken drain back
        end = getattr(self.backend, "end_drain", None)
        if end is not None:
            end()

    def execute(self, requests):
        self.watchdog.serving()
        for request in requests:
            key = request.request_id()
            if adapter.scalar(request, "stop"):
                self.stops.stop(key)
                adapter.send_final(request)
                continue
            sender = adapter.StreamSender(request, encoder(adapter.first(request, "media_sizes")))
            try:
                arrays, options = [adapter.required(request, n)[0] for n in INPUTS], adapter.scalar(request, "request")
                check_seals(self.seals, arrays, options, [adapter.first(request, n) for n in SEALS])
                stopped = self.stops.watch(key)
                job = job_from_tensors(arrays, options, sender.send, sender.send_error,
                                       lambda w=stopped, s=sender: w() or s.is_cancelled())
                self.backend.submit(job)
            except Exception as exc:
                sender.send_error(exc)
        return None

    def finalize(self):
        self.watchdog.stop()
        self.backend.stop()  # its threads end first: nothing sends or updates a metric after this
        adapter.StreamSender.close()  # the last responses (drained or failed requests) go out; the pump ends
        self.metrics.close()  # while the stub can still reach the server (adapter.TritonMetrics.close)
        adapter.finalized()
