"""Quantized decoders: quantize at load (torchao) and check a quantized checkpoint before loading it.

Two ways to a quantized decoder (docs/QUANTIZATION.md):

- ``llm.quantization`` on a 16/32-bit checkpoint: after transformers loads the model, torchao's
  ``quantize_`` replaces the weights of the decoder's linear layers (``model.language_model``);
  the vision tower, the embeddings and ``lm_head`` stay as loaded. Each scheme is refused on a
  device without a kernel for it (``check_scheme``), before anything loads.
- A checkpoint whose config.json has a ``quantization_config``: compressed-tensors through
  transformers' own loader and the library; GPTQ and AWQ (gemm) read by handlers/packed_quant.py;
  ``check_checkpoint`` first names what is wrong (an unknown method, a broken config, a missing
  library, a scheme the device cannot run), so the llm model's load stops with that message and
  not with a traceback from deep inside a loader (``check_serving``: every check, which `tritonvl
  serve` also runs before tritonserver starts). compressed-tensors layers stay compressed in memory
  and dequantize per forward (``prepare_loaded``).

``weight_bytes`` counts what a module's weights hold in memory (the quantized tensors' own parts),
reported at load (engine_info labels, the log).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCHEMES = ("none", "int8_weight_only", "int4_weight_only", "fp8")


class QuantizationError(RuntimeError):
    """A quantization the llm model cannot load: the message names it and what to do instead."""


def _device_kind(device) -> str:
    return str(device).split(":")[0]


def _cuda_capability(device) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(device)


def check_scheme(scheme: str, device) -> None:
    """Refuse ``scheme`` (llm.quantization) where ``device`` has no kernel for it."""
    if scheme == "none":
        return
    if scheme not in SCHEMES:
        raise QuantizationError(f"llm.quantization={scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"llm.quantization={scheme} needs torchao: pip install 'tritonvl[quant]' "
                                "(torchao==0.18.0)")
    kind = _device_kind(device)
    if scheme == "int4_weight_only" and kind != "cuda":
        raise QuantizationError(f"llm.quantization=int4_weight_only has no kernel on device {device} "
                                "(torchao's int4 weight-only matmul is CUDA's tinygemm); choose "
                                "int8_weight_only, or load a 4-bit checkpoint (compressed-tensors W4A16)")
    if scheme == "fp8":
        if kind != "cuda" or _cuda_capability(device) < (8, 9):
            where = f"device {device}" + (f" (compute capability {_cuda_capability(device)})" if kind == "cuda" else "")
            raise QuantizationError(f"llm.quantization=fp8 needs a GPU with FP8 matmuls (CUDA compute capability "
                                    f">= 8.9: Ada, Hopper, Blackwell); {where} has none: choose int8_weight_only")


def _torchao_config(scheme: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
    )

    if scheme == "int8_weight_only":  # per output channel, symmetric
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "int4_weight_only":  # tinygemm's packed layout (CUDA, bf16 activations)
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    return Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False)


def quantize_decoder(model, scheme: str, device) -> int:
    """Quantize the linear layers of ``model.model.language_model`` in place (torchao), each moved to
    ``device`` first; returns how many. ``lm_head``, the embeddings and the vision tower are not touched."""
    if scheme == "none":
        return 0
    check_scheme(scheme, device)
    import torch
    from torchao.quantization import quantize_

    decoder = model.model.language_model
    names = [n for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]
    if scheme == "int4_weight_only":  # tinygemm: in_features a multiple of the group
        names = [n for n in names if decoder.get_submodule(n).in_features % 128 == 0]
    chosen = set(names)
    quantize_(decoder, _torchao_config(scheme), filter_fn=lambda m, fqn: fqn in chosen, device=device)
    return len(names)


def tensor_bytes(t) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) counts its inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in inner)
    return t.numel() * t.element_size()


def weight_bytes(module) -> int:
    """Bytes of ``module``'s parameters and buffers as held in memory (shared tensors once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def describe(model, quantization: str) -> dict:
    """What the decoder holds (logged at load; labels of tritonvl_engine_info): its scheme, the bytes
    of its linear layers (the part a quantization shrinks) and of the whole decoder (+ embeddings)."""
    import torch

    decoder = model.model.language_model
    linear = sum(weight_bytes(m) for m in decoder.modules() if type(m).__name__ != "Embedding"
                 and (isinstance(m, torch.nn.Linear) or hasattr(m, "quantization_scheme") or hasattr(m, "qweight"))
                 and not list(m.children()))
    q = getattr(model.config, "quantization_config", None)
    if q is not None and not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else vars(q)
    method = (q or {}).get("quant_method") or quantization
    return {"quantization": str(getattr(method, "value", method)), "decoder_linear_bytes": linear,
            "decoder_weight_bytes": weight_bytes(decoder)}


def check_backend(backend: str, scheme: str) -> None:
    """llm.quantization quantizes the engine's decoder; the generate backend (transformers' generate())
    would silently run the 16/32-bit model: refuse the pair."""
    if backend == "generate" and scheme != "none":
        raise QuantizationError(f"llm.quantization={scheme} is applied by the engine backend only; "
                                "llm.backend=generate would run the unquantized model: set llm.backend=engine "
                                "or llm.quantization=none")


def check_serving(model_dir: str, device, scheme: str = "none", backend: str = "engine") -> dict | None:
    """Every check the llm model's load makes before reading weights (``tritonvl serve`` runs it before
    tritonserver starts, so a bad quantization exits at once instead of after every model's load):
    the scheme on ``device``, the backend, the checkpoint's ``quantization_config``."""
    check_scheme(scheme, device)
    check_backend(backend, scheme)
    return check_checkpoint(model_dir, device, scheme)


# ---- quantized checkpoints ----------------------------------------------------------------------

# quant_method -> (the library transformers' loader needs, its import name, the pip requirement);
# None: tritonvl reads the format itself (handlers/packed_quant.py: GPTQ's and AWQ-gemm's int32 packing)
METHODS = {
    "compressed-tensors": ("compressed-tensors", "compressed_tensors", "compressed-tensors==0.20.0"),
    "gptq": None,
    "awq": None,
}


def checkpoint_quantization(model_dir: str) -> dict | None:
    """config.json's ``quantization_config`` (None when the checkpoint is not quantized); a broken one
    (not an object, no ``quant_method``) raises QuantizationError naming it."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QuantizationError(f"{path}: cannot read it as JSON ({e})") from e
    if "quantization_config" not in config:
        return None
    q = config["quantization_config"]
    if not isinstance(q, dict):
        raise QuantizationError(f"{path}: quantization_config is {type(q).__name__}, not an object")
    method = q.get("quant_method")
    if not isinstance(method, str) or not method:
        raise QuantizationError(f"{path}: quantization_config has no quant_method (one of {', '.join(METHODS)})")
    return q


def _ct_schemes(q: dict) -> list[tuple[str, dict, dict | None]]:
    """compressed-tensors' config groups as (name, weights, input_activations), checked for shape."""
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantizationError("compressed-tensors quantization_config has no config_groups")
    out = []
    for name, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise QuantizationError(f"compressed-tensors config group {name!r} has no weights scheme")
        out.append((name, g["weights"], g.get("input_activations")))
    return out


def check_checkpoint(model_dir: str, device, scheme: str = "none") -> dict | None:
    """Before loading a quantized checkpoint: its method is known, its config readable, its library
    installed and its scheme runnable on ``device``; ``scheme`` (llm.quantization) must then be none.
    Returns the ``quantization_config`` (None for a 16/32-bit checkpoint)."""
    q = checkpoint_quantization(model_dir)
    if q is None:
        return None
    method = q["quant_method"]
    if scheme != "none":
        raise QuantizationError(f"{model_dir} is already quantized ({method}); llm.quantization={scheme} "
                                "quantizes a 16/32-bit checkpoint: set llm.quantization=none")
    if method not in METHODS:
        raise QuantizationError(f"quant_method {method!r} in {model_dir}/config.json is not supported; "
                                f"tritonvl loads {', '.join(METHODS)} (docs/QUANTIZATION.md)")
    if METHODS[method] is None:
        from tritonvl.handlers.packed_quant import PackedConfigError, parse_config

        try:
            parse_config(q)
        except PackedConfigError as e:
            raise QuantizationError(f"{model_dir}/config.json: {e}") from e
        if _device_kind(device) == "npu":
            raise QuantizationError(f"quant_method {method!r}: tritonvl's {method} unpacking (int32 bit shifts "
                                    f"per forward) is not tried on device {device}; use a compressed-tensors "
                                    "W4A16 or W8A8 checkpoint")
        return q
    dist, module, pip = METHODS[method]
    if importlib.util.find_spec(module) is None:
        raise QuantizationError(f"quant_method {method!r} needs the {dist} library, which is not installed: "
                                f"pip install {pip!r}" + (" (or pip install 'tritonvl[quant]')"
                                                          if method == "compressed-tensors" else ""))
    kind = _device_kind(device)
    if method == "compressed-tensors":
        for name, weights, acts in _ct_schemes(q):
            wtype = weights.get("type")
            if wtype not in ("int", "float"):
                raise QuantizationError(f"compressed-tensors config group {name!r}: weights type {wtype!r} "
                                        "is not int or float")
            if (wtype == "float" or (acts or {}).get("type") == "float") and kind == "npu":
                raise QuantizationError(f"compressed-tensors config group {name!r} is FP8 "
                                        f"({weights.get('num_bits')}-bit float); device {device} has no FP8 "
                                        "matmul: use an int8 (W8A8) or W4A16 checkpoint")
    return q


def prepare_loaded(model, per_layer: bool = True) -> int:
    """After transformers loaded a quantized checkpoint: compressed-tensors keeps the compressed
    tensors (packed int4, int8 or fp8 weights, scales, zero points) until the model's first forward,
    where a pre-hook on the whole model decompresses every layer to full-size weights; the engine never
    calls that forward (it runs the decoder's layers). ``per_layer`` (the default): each of the
    decoder's quantized linear layers keeps its compressed tensors and dequantizes its weight in its
    own forward (``_dequantize_per_layer``), so the decoder's linear layers hold ~1/6 (W4A16) or ~1/4
    (W8A8, FP8) of fp32's bytes. ``per_layer=False``: decompress them now, as that hook would (the
    speed comparison in docs/BENCHMARKS.md). Either way the hook is removed and a quantized lm_head is
    decompressed. The vision tower is left alone (the vision_encoder model loads its own). Returns how
    many layers dequantize per forward."""
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is None or not hasattr(model, "ct_decompress_hook"):
        return 0
    decoder = model.model.language_model
    n = 0
    if per_layer:
        import torch
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.utils import is_module_quantized

        for module in decoder.modules():
            if (is_module_quantized(module) and isinstance(module, torch.nn.Linear)
                    and getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED):
                _dequantize_per_layer(module, compressor.force_compression_format)
                n += 1
    else:
        compressor.decompress_model(decoder)
    if any(hasattr(m, "weight_packed") for m in model.lm_head.modules()):
        compressor.decompress_model(model.lm_head)
    compressor.remove_decompression_hook(model)
    return n


def _dequantize_per_layer(module, force_format=None) -> None:
    """Give a compressed-tensors linear layer (still compressed) a forward that dequantizes its weight
    into a temporary with the library's own decompression for its format (the values decompress_model
    gives), quantizes its input activations as the library's forward does (W8A8 int8 / FP8 dynamic
    per-token: ``forward_quantize``, a quantize-dequantize), runs the matmul and drops the temporary."""
    import types

    import torch
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.utils.module import get_direct_state_dict

    scheme = module.quantization_scheme
    fmt = CompressionFormat(force_format or scheme.format or infer_module_format(type(module), scheme))
    decompress = BaseCompressor.get_value_from_registry(fmt.value).decompress

    def forward(self, x):
        enabled = getattr(self, "quantization_enabled", True)
        state = decompress(get_direct_state_dict(self), scheme)
        weight = state["weight"]
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if enabled and scheme.input_activations:
            x = forward_quantize(self, x, "input", scheme.input_activations)
        out = torch.nn.functional.linear(x, weight, state.get("bias", self.bias))
        if enabled and scheme.output_activations:
            out = forward_quantize(self, out, "output", scheme.output_activations)
        return out

    module.forward = types.MethodType(forward, module)


# weight names that only a quantized linear layer has (compressed-tensors, GPTQ/AWQ)
QUANTIZED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "qweight",
                      "qzeros", "scales", "g_idx", "input_scale")


def check_tower_keys(model_dir: str, keys) -> None:
    """The vision tower runs in 16/32-bit: refuse a checkpoint whose tower weights are quantized."""
    bad = [k for k in keys if k.rsplit(".", 1)[-1] in QUANTIZED_SUFFIXES]
    if bad:
        q = checkpoint_quantization(model_dir) or {}
        raise QuantizationError(
            f"the vision tower of {model_dir} is quantized ({q.get('quant_method', 'unknown method')}: "
            f"{bad[0]}, ... {len(bad)} tensors); tritonvl runs the tower in 16/32-bit: quantize the "
            "decoder only (compressed-tensors: ignore the tower, e.g. ignore=['re:.*visual.*', 'lm_head']; "
            "AWQ: modules_to_not_convert=['visual'])")


def log(message: str) -> None:
    print(f"tritonvl llm: {message}", file=sys.stderr, flush=True)
