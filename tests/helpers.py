"""Test helpers: a transformers reference and plain tritonclient calls (no tritonvl client)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import queue
from functools import partial

import numpy as np
from PIL import Image

MODEL = "qwen2_5_vl"


def make_image(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    # smooth-ish random content so lossy formats keep it recognizable
    small = rng.integers(0, 255, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def proc_info(p, what: str = "name"):
    """``p.name()`` / ``p.cmdline()`` of a psutil process; "" / [] for one gone meanwhile (a process
    tree snapshot holds the stub monitors' short-lived children)."""
    import psutil

    try:
        return getattr(p, what)()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return [] if what == "cmdline" else ""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class Reference:
    """transformers' generate() on the same model: the parity oracle."""

    def __init__(self, model_dir, device: str = "cpu", dtype=None) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.torch = torch
        self.device = device
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.ip = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype or torch.float32).to(device).eval()
        self.cfg = json.loads(open(f"{model_dir}/config.json").read())
        self._answers: dict = {}
        self.near_ties: float | None = None  # see tests/server/family_cases.py expect()

    def inputs(self, text: str | None = None, images: list[bytes] = (), messages: list | None = None) -> dict:
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        if messages is None:
            messages = [{"role": "user", "content": [{"type": "image"}] * len(pil) + [{"type": "text", "text": text}]}]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        torch = self.torch
        kwargs = {}
        if pil:
            px = self.ip(images=pil, return_tensors="pt")
            merge = self.cfg["vision_config"]["spatial_merge_size"] ** 2
            parts = prompt.split("<|image_pad|>")
            assert len(parts) == len(pil) + 1
            counts = [int(g.prod()) // merge for g in px["image_grid_thw"]]
            prompt = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
            kwargs = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if pil:
            kwargs["mm_token_type_ids"] = (ids == self.cfg["image_token_id"]).int()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kwargs}

    def generate(self, text=None, images=(), messages=None, max_tokens: int = 16, **gen) -> list[int]:
        """Greedy token ids; each distinct question is computed once per instance (modules share the
        session's ``reference``, and several ask the same prompts)."""
        key = (text, tuple(images), json.dumps(messages, sort_keys=True), max_tokens, json.dumps(gen, sort_keys=True,
                                                                                             default=repr))
        if key not in self._answers:
            inputs = {k: v.to(self.device) for k, v in self.inputs(text, images, messages).items()}
            with self.torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, **gen)
            self._answers[key] = out[0, inputs["input_ids"].shape[1]:].tolist()
        return list(self._answers[key])

    def step_logits(self, text=None, images=(), step: int = 0):
        """generate()'s greedy logits [vocab] at output step ``step`` (its own decode with a KV cache)."""
        inputs = {k: v.to(self.device) for k, v in self.inputs(text, images).items()}
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=step + 1, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
        return out.logits[step][0].float().cpu()


def _inputs(module, fields: dict):
    """tritonclient InferInput list from a dict of Python values (batch dim added)."""
    types = {str: "BYTES", bytes: "BYTES", bool: "BOOL", int: "INT32", float: "FP32"}
    out = []
    for name, value in fields.items():
        if name == "seed":
            arr, dtype = np.array([[value]], dtype=np.uint64), "UINT64"
        elif isinstance(value, list):
            if value and isinstance(value[0], int):
                arr, dtype = np.array([value], dtype=np.int32), "INT32"
            else:
                arr, dtype = np.array([[v.encode() if isinstance(v, str) else v for v in value]],
                                      dtype=np.object_), "BYTES"
        else:
            dtype = types[type(value)]
            npt = {"BYTES": np.object_, "BOOL": bool, "INT32": np.int32, "FP32": np.float32}[dtype]
            v = value.encode() if isinstance(value, str) else value
            arr = np.array([[v]], dtype=npt)
        inp = module.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def _result(res) -> dict:
    out = {}
    for name in ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "output_ids", "logprobs"):
        arr = res.as_numpy(name)
        if arr is None:
            continue
        if name == "logprobs":  # one JSON object per token
            out[name] = [e.decode("utf-8") for e in arr.reshape(-1)]
        elif name in ("text_output", "finish_reason"):
            out[name] = arr.reshape(-1)[0].decode("utf-8")
        elif name == "output_ids":
            out[name] = arr.reshape(-1).tolist()
        else:
            out[name] = int(arr.reshape(-1)[0])
    return out


def infer_http(url: str, **fields) -> dict:
    """POST /v2/models/qwen2_5_vl/generate (Triton's HTTP /infer refuses decoupled models)."""
    import requests

    body = {k: ([base64.b64encode(v).decode() if isinstance(v, bytes) else v for v in value]
                if isinstance(value, list) else value) for k, value in fields.items()}
    r = requests.post(f"http://{url}/v2/models/{MODEL}/generate", json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
    out = r.json()
    if not isinstance(out.get("output_ids"), list):
        out["output_ids"] = [out["output_ids"]]
    return out


def stream_results(url: str, model: str, inputs: list, timeout: float = 120, **infer) -> list:
    """Every response (a tritonclient InferResult) of one gRPC stream to ``model``, up to and with
    the one flagged final; raises an error response. ``infer``: more async_stream_infer arguments
    (e.g. outputs=[...])."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), responses))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True, **infer)
        out = []
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            out.append(result)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def stream_grpc(url: str, timeout: float = 120, **fields) -> list[dict]:
    """All responses of one streamed request, in order (raises on an error response)."""
    import tritonclient.grpc as grpcclient

    parsed = (_result(r) for r in stream_results(url, MODEL, _inputs(grpcclient, fields), timeout))
    return [p for p in parsed if p]


def joined(responses: list[dict]) -> dict:
    """Concatenate a stream into the shape of one response."""
    return {
        "text_output": "".join(r.get("text_output", "") for r in responses),
        "output_ids": [t for r in responses for t in r.get("output_ids", [])],
        "finish_reason": responses[-1].get("finish_reason"),
        "num_output_tokens": responses[-1].get("num_output_tokens"),
    }


def metrics(server, model: str = "llm") -> dict[str, float]:
    """tritonvl_* values of one model from the metrics endpoint (histograms: _count and _sum)."""
    import re

    import requests

    text = requests.get(server.metrics_url, timeout=10).text
    out = {}
    for m in re.finditer(r'^(tritonvl_\w+)\{model="([^"]+)",version="[^"]*"\} (\S+)$', text, re.M):
        if m.group(2) == model:
            out[m.group(1)] = float(m.group(3))
    return out


class GaugePeak:
    """Polls one tritonvl gauge while a block runs and keeps its highest value (``with ... as peak``)."""

    def __init__(self, server, name: str, interval: float = 0.02) -> None:
        import threading

        self.server, self.name, self.interval = server, name, interval
        self.peak, self.samples = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, metrics(self.server).get(self.name, 0.0))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> GaugePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def to_published_layout(src, dst) -> None:
    """Rewrite a model built by transformers 5 in the layout of the published Qwen2.5-VL checkpoints
    (transformers 4.x): text fields at the top of config.json with ``rope_scaling`` {type: mrope},
    ``in_chans``, weights named ``model.layers.*`` / ``visual.*``, in two shards with an index."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):  # not e.g. an exported onnx/
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types", "pad_token_id"):
        text.pop(key, None)
    vision = cfg.pop("vision_config")
    vision["in_chans"] = vision.pop("in_channels")
    vision.pop("rope_parameters", None)
    vision.pop("model_type", None)
    cfg.pop("dtype", None)
    legacy = {**cfg, **text, "rope_theta": rope["rope_theta"], "vision_config": vision,
              "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
              "torch_dtype": "float32", "transformers_version": "4.49.0", "vision_token_id": 151654}
    (dst / "config.json").write_text(json.dumps(legacy, indent=2))
    state = load_file(str(src / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        for old, new in (("model.language_model.", "model."), ("model.visual.", "visual.")):
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value.contiguous()
    keys = sorted(renamed)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: renamed[k] for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_offline_equals_generate(model_dir, specs, ref_dir=None, **pipeline_kwargs) -> str:
    """Run ``specs`` [(text, [image bytes], max_tokens)] all in flight through the in-process engine
    (OfflinePipeline, CPU float32) and check each against generate() on ``ref_dir`` (default: the same).
    Returns the attention backend the engine ran."""
    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools.offline import OfflinePipeline

    kwargs = {"kv_cache_bytes": 1 << 24, **pipeline_kwargs}
    with OfflinePipeline(str(model_dir), device="cpu", dtype="float32", **kwargs) as pipe:
        backend = pipe.engine.runner.backend.name
        got = pipe.generate([RawRequest(text_input=t.encode(), images=list(im), sampling={"max_tokens": n})
                             for t, im, n in specs])
    ref = Reference(str(ref_dir or model_dir))
    for (text, images, n), res in zip(specs, got):
        assert not res.error, res.error
        assert res.token_ids == ref.generate(text, images, max_tokens=n), (backend, text)
    return backend


@contextlib.contextmanager
def running_server(model_dir, log_dir, **kwargs):
    """A tritonserver (ServerProcess) for a test session or module that must still be alive at its end."""
    from tritonvl.handlers.tools.launcher import ServerProcess

    with ServerProcess(str(model_dir), log_path=str(log_dir / "tritonserver.log"), **kwargs) as srv:
        yield srv
        alive = srv.proc.poll() is None
    assert alive, "the server died during the tests:\n" + srv.log_tail()


@contextlib.contextmanager
def media_host(files: dict[str, tuple[bytes, str]]):
    """A local HTTP server for a test: ``files`` maps a path to (body, content type); other paths
    answer 404. Yields (port, the list of paths it was asked for); stopped on exit."""
    import http.server
    import threading

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            if self.path not in files:
                self.send_error(404)
                return
            body, kind = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
