"""Every config.pbtxt parameter of the three Python models, declared once: type, default, rule, doc.

Each model's parameters are one frozen dataclass whose fields carry their rule, default and doc;
``read(model, raw)`` turns a config's string values into that typed object and refuses unknown keys
and bad values with a message naming the model, the key and the rule. ``SETTINGS`` are the
config.pbtxt fields ``tritonvl serve --set`` may also change (instance group, dynamic batcher).
Torch-free: ``--set`` is checked before anything loads. docs/PARAMETERS.md is generated from here:

    python -m tritonvl.handlers.params --markdown > docs/PARAMETERS.md
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from tritonvl.handlers.devices import cpu_threads


class ParamError(ValueError):
    """A config.pbtxt parameter or ``--set`` value that is unknown or breaks its rule."""


# ---- rules: parse a string value, say what is expected ------------------------------------------


class Rule:
    empty: object = None  # the value of an unset parameter whose default is empty

    def parse(self, text: str) -> object:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Rule):
    min: int | None = None

    def parse(self, text: str) -> int:
        value = int(text)
        if self.min is not None and value < self.min:
            raise ValueError
        return value

    def describe(self) -> str:
        return "an integer" + (f" >= {self.min}" if self.min is not None else "")


@dataclass(frozen=True)
class Float(Rule):
    min: float = 0.0
    max: float | None = None
    open_min: bool = False  # min itself refused
    finite: bool = False  # inf refused (a time limit: inf passed, then failed every use as INTERNAL)

    def parse(self, text: str) -> float:
        value = float(text)
        if value != value or value < self.min or (self.open_min and value == self.min):
            raise ValueError
        if (self.max is not None and value > self.max) or (self.finite and value == float("inf")):
            raise ValueError
        return value

    def describe(self) -> str:
        low = f"{'>' if self.open_min else '>='} {self.min:g}"
        return f"a {'finite ' if self.finite else ''}number {low}" + (
            f" and <= {self.max:g}" if self.max is not None else "")


class Bool(Rule):
    def parse(self, text: str) -> bool:
        word = text.lower()
        if word in ("true", "1", "yes"):
            return True
        if word in ("false", "0", "no"):
            return False
        raise ValueError

    def describe(self) -> str:
        return "true/false (also 1/0, yes/no)"


class Choice(Rule):
    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def parse(self, text: str) -> str:
        for c in self.choices:  # case-insensitive; the canonical spelling comes back
            if c.lower() == text.lower():
                return c
        raise ValueError

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)


class Text(Rule):
    empty = ""

    def parse(self, text: str) -> str:
        return text

    def describe(self) -> str:
        return "text"


class Threads(Rule):
    def parse(self, text: str) -> int:
        return cpu_threads(text, share=0.5)

    def describe(self) -> str:
        return "an integer >= 0 (0 = torch's default, one per core) or auto (half the cores)"


class ListOf(Rule):
    empty = ()

    def __init__(self, item: Rule) -> None:
        self.item = item

    def parse(self, text: str) -> tuple:
        return tuple(self.item.parse(part.strip()) for part in text.split(",") if part.strip())

    def describe(self) -> str:
        return f"a comma-separated list, each {self.item.describe()}"


def param(rule: Rule, default: str, doc: str):
    """A parameter: its rule, its default as config.pbtxt would spell it ("" = unset), one line of doc."""
    return field(metadata={"rule": rule, "default": default, "doc": doc})


# ---- the parameters of each model ---------------------------------------------------------------

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # Pillow format names


@dataclass(frozen=True, kw_only=True)
class CommonParams:
    model_path: str = param(
        Text(), "", "Hugging Face model directory; empty: $TRITONVL_MODEL, else the embedded tiny model"
    )
    exit_on_stub_failure: bool = param(
        Bool(), "true", "stop the whole server when a sibling model's stub process dies (the watchdog)"
    )


@dataclass(frozen=True, kw_only=True)
class PreprocessParams(CommonParams):
    max_model_len: int | None = param(
        Int(2), "", "longest prompt + output in tokens, refused here before the vision step runs; empty: the "
        "model's max_position_embeddings; `tritonvl serve --set llm.max_model_len=N` sets it too"
    )
    default_max_tokens: int = param(Int(1), "256", "max_tokens of a request that sets none")
    clamp_max_tokens: bool = param(
        Bool(), "false", "a max_tokens past max_model_len minus the prompt is cut to fit; false: INVALID_ARG with the numbers"
    )
    min_pixels: int | None = param(
        Int(1), "", "smallest image area after Qwen's resize; requests may lower it; empty: the model's processor"
    )
    max_pixels: int | None = param(
        Int(1), "", "largest image area after Qwen's resize (bounds image tokens); requests may lower it, not raise "
        "it; empty: the model's processor"
    )
    max_image_bytes: int = param(Int(1), "20971520", "encoded bytes per image")
    max_image_pixels: int = param(
        Int(1), "40000000", "pixels per image, read from the header before decoding"
    )
    max_images_per_request: int = param(Int(0), "8", "images per request")
    image_formats: tuple[str, ...] = param(
        ListOf(Choice(*IMAGE_FORMATS)), "JPEG,PNG,WEBP,GIF,BMP", "image formats accepted"
    )
    max_prompt_bytes: int = param(
        Int(1), "1048576", "UTF-8 bytes of a request's text, checked before tokenizing"
    )
    image_url_allowlist: tuple[str, ...] = param(
        ListOf(Text()),
        "",
        "hosts whose http(s) image and video URLs are "
        "fetched (`img.example.com`, `*.cdn.example`); empty: URLs refused",
    )
    image_url_timeout_s: float = param(
        Float(0, open_min=True, finite=True), "10", "seconds per image (or video) URL fetch in all: name lookup, "
        "connect, headers and body of every redirect"
    )
    image_url_allow_private: bool = param(
        Bool(), "false", "allow-listed hosts may resolve to private addresses (RFC 1918, IPv6 unique-local: an "
        "in-cluster media store); loopback, link-local (169.254.169.254 metadata), CGNAT, unspecified, multicast "
        "and reserved addresses stay refused; false: public addresses only"
    )
    image_url_allow_loopback: bool = param(
        Bool(), "false", "for tests and a media server on this machine only: allow-listed hosts may resolve to "
        "loopback (127.0.0.0/8, ::1); link-local and metadata addresses stay refused"
    )
    # video (docs/VIDEO.md): sampling like qwen-vl-utils; a request's part keys may lower these, not raise them
    max_videos_per_request: int = param(Int(0), "2", "videos per request")
    max_video_bytes: int = param(Int(1), "104857600", "encoded bytes per video")
    max_video_seconds: float = param(Float(0, open_min=True), "600", "longest video, from its header")
    max_video_frames: int = param(
        Int(1), "4096", "frames a video (or frame list) may hold before sampling (counted before decoding)"
    )
    max_video_decoded_pixels: int = param(
        Int(1), "8493465600", "pixels the videos of one request may decode (frames decoded x frame area, from the "
        "headers before any frame is decoded: a container decodes every frame up to its last sampled one, a "
        "frame list only its sampled frames); default: 4096 frames of 1920x1080"
    )
    video_decode_timeout_s: float = param(
        Float(0, open_min=True, finite=True), "60", "seconds the videos of one request may take to decode "
        "(checked between frames); past it the request is INVALID_ARG"
    )
    video_fps: float = param(Float(0, open_min=True), "2", "frames sampled per second when the request gives no fps")
    video_min_frames: int = param(Int(2), "4", "fewest frames sampled by fps")
    video_max_frames: int = param(Int(2), "768", "most frames sampled (also the bound of a request's num_frames)")
    video_min_pixels: int | None = param(
        Int(1), "", "smallest frame area after Qwen's resize; empty: 128 tokens (128 * 28 * 28, Qwen3-VL 128 * 32 * 32)"
    )
    video_max_pixels: int | None = param(
        Int(1), "", "largest frame area after Qwen's resize; empty: 768 tokens (768 * 28 * 28, Qwen3-VL 768 * 32 * 32)"
    )
    video_total_pixels: int | None = param(
        Int(1), "", "frame area x frames budget of one video: more frames give smaller frames; empty: 24576 tokens "
        "(24576 * 28 * 28, Qwen3-VL 24576 * 32 * 32)"
    )
    video_cache_bytes: int = param(
        Int(0), "134217728", "bytes of decoded videos each preprocess instance keeps by content hash, so a video "
        "sent again (each turn of a chat about it) is not decoded again; 0: off"
    )


@dataclass(frozen=True, kw_only=True)
class DeviceParams(CommonParams):
    device: str | None = param(
        Choice("cpu", "cuda", "npu"),
        "",
        "force a device; empty: $TRITONVL_DEVICE, else the instance group (docs/DEVICES.md)",
    )
    dtype: str = param(
        Choice("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
        "auto",
        "weights and activations; auto: float32 on CPU, bfloat16 on GPU/NPU",
    )
    npu_device_ids: tuple[int, ...] = param(
        ListOf(Int(0)), "", "Ascend NPUs the group's instances take round-robin (any instance kind)"
    )
    num_threads: int = param(Threads(), "0", "torch CPU threads per instance")


@dataclass(frozen=True, kw_only=True)
class VisionParams(DeviceParams):
    # auto: the llm in the same server uses every core; two pools as wide as the machine fight.
    num_threads: int = param(Threads(), "auto", "torch CPU threads per instance")
    embedding_cache_bytes: int = param(
        Int(0), "268435456", "LRU cache of image embeddings by content; 0: off"
    )
    internal_inputs: str = param(
        Choice("sealed", "open"), "sealed", "sealed: only inputs this server's preprocess made (handlers/seals.py; a "
        "direct call is INVALID_ARG); open: any, for debugging (a caller can then send what it likes)"
    )
    runtime: str = param(
        Choice("torch", "onnxruntime"), "torch", "runs the tower: torch, or onnxruntime on an ONNX export (docs/ONNX.md)"
    )
    onnx_path: str = param(
        Text(), "", "the ONNX graph (runtime onnxruntime); empty: MODEL_DIR/onnx/vision_encoder.onnx, exported once"
    )
    onnx_providers: tuple[str, ...] = param(
        ListOf(Text()), "", "onnxruntime execution providers; empty: chosen from the instance's device"
    )


@dataclass(frozen=True, kw_only=True)
class LLMParams(DeviceParams):
    backend: str = param(
        Choice("engine", "generate"),
        "engine",
        "engine: continuous batching, paged KV cache; "
        "generate: transformers' generate(), one request "
        "at a time (the baseline)",
    )
    kv_cache_bytes: int | None = param(
        Int(0), "", "KV cache bytes; empty or 0: 1 GiB on CPU, kv_cache_fraction on GPU/NPU"
    )
    kv_cache_fraction: float = param(
        Float(0, 1, open_min=True),
        "0.5",
        "share of the device memory free after loading that the KV cache takes",
    )
    block_size: int | None = param(Int(1), "", "tokens per KV block; empty: the attention backend's default")
    max_num_seqs: int = param(Int(1), "64", "sequences running at once")
    max_num_batched_tokens: int = param(
        Int(1), "2048", "tokens per engine step (prefill chunks + one per decode)"
    )
    max_model_len: int | None = param(
        Int(2), "", "longest sequence; empty: max_position_embeddings, capped by the KV cache"
    )
    enable_prefix_caching: bool = param(
        Bool(), "true", "reuse KV blocks of equal prefixes (images by content)"
    )
    max_waiting: int = param(Int(1), "1024", "requests waiting for admission; past it UNAVAILABLE at once")
    stream_interval: int = param(
        Int(1), "1", "a streaming request's response carries this many new tokens (the first token and "
        "the last response go out at once): fewer responses, less CPU per token on the way out (vLLM's "
        "--stream-interval)"
    )
    request_deadline_s: float = param(
        Float(0), "600", "a request still generating after this ends with UNAVAILABLE; 0: no deadline"
    )
    drain_deadline_s: float = param(
        Float(0), "20", "on SIGTERM/SIGINT, requests in flight run this much longer, then end with "
        "finish_reason cancelled; keep it under tritonserver's --exit-timeout-secs (30)",
    )
    attention_backend: str = param(
        Choice("auto", "sdpa", "flash_attn", "triton", "npu"),
        "auto",
        "paged attention kernel (docs/DEVICES.md); auto picks by device, falls back to sdpa",
    )
    cpu_linear: str = param(
        Choice("onednn", "torch"), "onednn", "CPU fp32 decoder linear layers: onednn: oneDNN's packed GEMM (a copy "
        "of each weight in oneDNN's layout, made at load; the original is let go; q/k/v and gate/up each packed as "
        "one product), torch: F.linear (MKL). "
        "With compile=decode each layer is packed alone (the compiled graph calls it as an opaque op). "
        "Quantized layers, other dtypes and devices always run F.linear"
    )
    cpu_greedy_screen: bool = param(
        Bool(), "true", "greedy steps on an fp32 CPU output layer: an int8 copy of its weight (made at load) bounds "
        "every logit, and the few entries that can still be the maximum are computed again in fp32: the same ids "
        "as the fp32 product. On CPUs with VNNI the input is rounded to int8 too and steps of any size are "
        "screened (oneDNN's int8 GEMM: about a third of the fp32 GEMM's time at 32 rows; outlier channels in fp32); elsewhere steps of up "
        "to 4 rows (bfloat16 input, a quarter of the reads). A screen that cannot decide on over a quarter of "
        "its first 64 steps turns itself off. false: the fp32 product every step (no copy)"
    )
    compile: str = param(
        Choice("none", "decode"), "none", "decode: the decoder compiled with torch.compile for decode steps padded "
        "to compile_buckets (CUDA graphs on CUDA with the triton attention backend), compiled at load; other "
        "steps run eager. Off by default: on CPU it takes minutes per bucket to compile and gains little at "
        "batch 1 (docs/DEVICES.md, docs/BENCHMARKS.md)"
    )
    compile_buckets: tuple = param(
        ListOf(Int(1)), "1,2,4,8,16,32,64", "decode batch sizes compiled when compile=decode (those up to the "
        "first >= max_num_seqs); a batch is padded to the next one"
    )
    tensor_parallel_size: int = param(
        Int(1), "1", "ranks the decoder is sharded over (torch.distributed: NCCL on CUDA, HCCL on Ascend, gloo on "
        "CPU); each instance takes this many devices of its own; heads and KV heads must divide by it "
        "(docs/DEVICES.md)"
    )
    grammar_compile_timeout_s: float = param(
        Float(0, open_min=True), "30", "a structured-output grammar still compiling after this fails its request "
        "(docs/STRUCTURED.md)"
    )
    grammar_cache_bytes: int = param(Int(0), "536870912", "compiled grammars kept, LRU by bytes")
    quantization: str = param(
        Choice("none", "int8_weight_only", "int4_weight_only", "fp8"), "none",
        "quantize the decoder's linear layers at load (torchao; docs/QUANTIZATION.md); int4_weight_only: CUDA "
        "only, fp8: CUDA compute capability >= 8.9; none for a checkpoint that is quantized already",
    )
    internal_inputs: str = param(
        Choice("sealed", "open"), "sealed", "sealed: only inputs this server's preprocess and vision_encoder made "
        "(handlers/seals.py; a direct call is INVALID_ARG); open: any, for debugging"
    )


@dataclass(frozen=True, kw_only=True)
class FrontParams:
    """The public model `qwen2_5_vl` (BLS front over the three models above)."""

    exit_on_stub_failure: bool = param(
        Bool(), "true", "stop the whole server when a sibling model's stub process dies (the watchdog)"
    )
    max_inflight_requests: int = param(
        Int(1), "1088", "requests the front serves at once (a thread each); past it RESOURCE_EXHAUSTED at once; "
        "default: llm's max_num_seqs + max_waiting"
    )
    drain_deadline_s: float = param(
        Float(0), "25", "on SIGTERM/SIGINT, a request still streaming from llm this much later gets a final "
        "UNAVAILABLE error (llm ends its own at its drain_deadline_s; this is the backstop when llm cannot "
        "answer any more, e.g. its stub died); keep it under tritonserver's --exit-timeout-secs (30)",
    )


MODELS: dict[str, type] = {"preprocess": PreprocessParams, "vision_encoder": VisionParams, "llm": LLMParams,
                           "qwen2_5_vl": FrontParams}


@dataclass(frozen=True)
class Setting:
    """A config.pbtxt field outside `parameters` that ``--set`` rewrites (every model of MODELS)."""

    rule: Rule
    doc: str


SETTINGS: dict[str, Setting] = {
    "instance_count": Setting(Int(1), "instances of the model (`instance_group` count)"),
    "instance_kind": Setting(
        Choice("KIND_CPU", "KIND_GPU", "KIND_MODEL"), "`instance_group` kind (KIND_GPU: one instance per GPU)"
    ),
    "max_queue_delay_microseconds": Setting(Int(0), "how long the dynamic batcher waits for more requests"),
    "preferred_batch_size": Setting(ListOf(Int(1)), "the dynamic batcher's preferred batch sizes"),
}


# ---- reading and checking -----------------------------------------------------------------------


def unset(text: str | None) -> bool:
    """Empty and ``${...}`` placeholders (left by a template) mean "use the default"."""
    return text is None or text.strip() == "" or text.strip().startswith("${")


def _model(model: str) -> type:
    if model not in MODELS:
        raise ParamError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}")
    return MODELS[model]


def _unknown(model: str, key: str, known: list[str]) -> ParamError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ParamError(
        f"{model}: unknown parameter {key!r}{hint}; known: {', '.join(known)} (docs/PARAMETERS.md)"
    )


def parse_value(model: str, key: str, rule: Rule, text: str) -> object:
    try:
        return rule.parse(text.strip())
    except ValueError:
        raise ParamError(f"{model}: parameter {key!r} = {text!r}: expected {rule.describe()}") from None


def read(model: str, raw: Mapping[str, str]):
    """The typed parameters of ``model`` from a config's string values; unset ones take their default."""
    cls = _model(model)
    declared = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in declared:
            raise _unknown(model, key, list(declared))
    values = {}
    for name, f in declared.items():
        text = raw.get(name)
        text = f.metadata["default"] if unset(text) else text
        rule = f.metadata["rule"]
        values[name] = rule.empty if text == "" else parse_value(model, name, rule, text)
    return cls(**values)


def typed_strings(model: str, raw: Mapping[str, str]) -> dict:
    """``raw``'s keys with their string values typed as a config's would be (lists, choices, ...): the
    keyword arguments ``typed`` / the offline pipeline take; a misspelt key or a bad value is a ParamError."""
    values = read(model, raw)
    return {key: getattr(values, key) for key in raw}


def typed(model: str, **values):
    """The typed parameters of ``model``: the defaults, with ``values`` (already typed) in place
    (the offline pipeline and tests; a misspelt name is a TypeError)."""
    return replace(read(model, {}), **values)


def check(model: str, key: str, value: str) -> None:
    """Raise ParamError unless ``model.key=value`` is a valid parameter or setting (``--set``)."""
    declared = {f.name: f.metadata["rule"] for f in fields(_model(model))}
    rules = declared | {k: s.rule for k, s in SETTINGS.items()}
    if key not in rules:
        raise _unknown(model, key, list(rules))
    if not (key in declared and unset(value)):
        parse_value(model, key, rules[key], value)


# ---- docs/PARAMETERS.md -------------------------------------------------------------------------


def markdown() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Model parameters",
        "",
        "Generated from `handlers/params.py` by `python -m tritonvl.handlers.params --markdown > "
        "docs/PARAMETERS.md`; do not edit by hand.",
        "",
        "Each is a `parameters` entry of the model's `config.pbtxt`. Empty values and `${...}` "
        "placeholders mean the default. An unknown key or a bad value stops that model's load with a "
        "message naming the key and the rule. Try a value for one run without editing "
        "`model_repository/`: `tritonvl serve --set llm.max_num_seqs=16 --set "
        "llm.instance_kind=KIND_GPU` (repeatable; checked before tritonserver starts).",
        "",
    ]
    for model, cls in MODELS.items():
        lines += [f"## {model}", "", "| key | type | default | |", "|---|---|---|---|"]
        for f in fields(cls):
            m = f.metadata
            default = f"`{m['default']}`" if m["default"] else "(empty)"
            lines.append(f"| `{f.name}` | {cell(m['rule'].describe())} | {default} | {cell(m['doc'])} |")
        lines.append("")
    lines += [
        "## Instance group and batching (`--set` only, every model above)",
        "",
        "`tritonvl serve --set MODEL.KEY=VALUE` also rewrites these fields of the copied `config.pbtxt`.",
        "",
        "| key | type | |",
        "|---|---|---|",
    ]
    lines += [f"| `{k}` | {cell(s.rule.describe())} | {cell(s.doc)} |" for k, s in SETTINGS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m tritonvl.handlers.params --markdown > docs/PARAMETERS.md")
    sys.stdout.write(markdown())
