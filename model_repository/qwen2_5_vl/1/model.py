"""qwen2_5_vl (decoupled, the public model): the interface of qwen2_5_vl_ensemble (docs/INTERFACE.md).

preprocess -> vision_encoder -> llm through BLS; llm's responses go straight to the client; a
client's cancel becomes an explicit stop of that llm request (handlers/tritonserver/front.py).
"""

from tritonvl.handlers.tritonserver import adapter
from tritonvl.handlers.tritonserver.front import Front, ModelCalls


class TritonPythonModel:
    def initialize(self, args):
        model_args = adapter.ModelArgs(args, "qwen2_5_vl")
        outputs = [o["name"] for o in model_args.config["output"]]  # llm's, forwarded as they come
        self.front = Front(ModelCalls(adapter.bls_call, adapter.bls_stream, adapter.bls_stop), outputs=outputs,
                           max_inflight=model_args.params.max_inflight_requests)
        self.watchdog = adapter.watchdog(model_args, on_shutdown=lambda: self.front.begin_drain(model_args.params.drain_deadline_s))
        self.watchdog.on_resume.append(self.front.end_drain)  # a drain begun by mistake is taken back

    def execute(self, requests):
        self.watchdog.serving()
        for request in requests:
            self.front.submit(adapter.FrontRequest(request))
        return None

    def finalize(self):
        self.watchdog.stop()
        self.front.end_all()  # unloaded with requests still streaming (llm gone): end them, or they hang
        self.front.close()  # its threads end before the stub tears down (issue 30)
        adapter.release_bls()  # the finished llm streams it kept (adapter._Keeper)
        adapter.finalized()
