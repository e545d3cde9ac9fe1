"""qwen2_5_vl (decoupled, the public model): the interface of qwen2_5_vl_ensemble (docs/INTERFACE.md).

preprocess -> vision_encoder -> llm through BLS; llm's responses go straight to the client; a
client's cancel becomes an explicit stop of that llm request (handlers/tritonserver/front.py).
"""

from tritonvl.handlers.tritonserver import adapter as ta
from tritonvl.handlers.tritonserver.front import Calls, Front


class TritonPythonModel:
    def initialize(self, args):
        cfg = ta.ModelArgs(args, "qwen2_5_vl")
        outputs = [o["name"] for o in cfg.config["output"]]  # llm's, forwarded as they come
        self.front = Front(Calls(ta.bls_call, ta.bls_stream, ta.bls_stop), outputs=outputs,
                           max_inflight=cfg.params.max_inflight_requests)
        self.watchdog = ta.watchdog(cfg, on_shutdown=lambda: self.front.begin_drain(cfg.params.drain_deadline_s))
        self.watchdog.on_resume.append(self.front.end_drain)  # a drain begun by mistake is taken back

    def execute(self, requests):
        self.watchdog.serving()
        for request in requests:
            self.front.submit(ta.Forward(request))
        return None

    def finalize(self):
        self.watchdog.stop()
        self.front.end_all()  # unloaded with requests still streaming (llm gone): end them, or they hang
        self.front.close()  # its threads end before the stub tears down (issue 30)
        ta.release_bls()  # the finished llm streams it kept (adapter._Keeper)
        ta.finalized()
