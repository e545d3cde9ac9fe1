"""llm (decoupled): input_ids, image_embeds, image_grid_thw, image_hashes, request ->
text_output, finish_reason, num_input_tokens, num_output_tokens, output_ids.

execute() only enqueues; the backend's thread owns the device and sends the responses: one per
text delta when streaming, else exactly one; the last one carries the FINAL flag.
"""

from tritonvl.handlers.llm.backend import make_backend
from tritonvl.handlers.llm.job import job_from_tensors
from tritonvl.handlers.tritonserver import adapter as ta


class TritonPythonModel:
    def initialize(self, args):
        cfg = ta.ModelArgs(args, "llm")
        self.watchdog = ta.watchdog(cfg)
        self.backend = make_backend(cfg, ta.TritonMetrics("llm"))

    def execute(self, requests):
        for request in requests:
            sender = ta.StreamSender(request)
            try:
                job = job_from_tensors(*(ta.tensor(request, n)[0] for n in (
                    "input_ids", "image_embeds", "image_grid_thw", "image_hashes")),
                    ta.scalar(request, "request"), sender.send, sender.send_error, sender.is_cancelled)
                self.backend.submit(job)
            except Exception as exc:
                sender.send_error(exc)
        return None

    def finalize(self):
        if self.watchdog:
            self.watchdog.stop()
        self.backend.stop()
        ta.StreamSender.flush()  # the last responses (drained or failed requests) go out
