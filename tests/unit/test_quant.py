"""handlers/quant.py: which schemes each device runs, what a quantized checkpoint must say, and that
quantize-at-load touches only the decoder's linear layers (docs/QUANTIZATION.md)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from tritonvl.handlers import quant
from tritonvl.handlers.quant import QuantizationError


def test_none_and_int8_run_on_cpu():
    quant.check_scheme("none", "cpu")
    pytest.importorskip("torchao")
    quant.check_scheme("int8_weight_only", "cpu")


@pytest.mark.parametrize("scheme, words", [("int4_weight_only", ["int4_weight_only", "device cpu", "int8_weight_only"]),
                                           ("fp8", ["fp8", "device cpu", "8.9", "int8_weight_only"])])
def test_schemes_without_a_cpu_kernel_are_refused_naming_the_device(scheme, words):
    pytest.importorskip("torchao")
    with pytest.raises(QuantizationError) as e:
        quant.check_scheme(scheme, "cpu")
    for w in words:
        assert w in str(e.value)


def test_a_missing_torchao_is_named_with_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(QuantizationError, match=r"needs torchao: pip install 'tritonvl\[quant\]'"):
        quant.check_scheme("int8_weight_only", "cpu")


def _with_config(model_dir, tmp_path, quantization_config=None, raw: str | None = None):
    d = tmp_path / "ckpt"
    d.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (d / "config.json").write_text(raw if raw is not None else json.dumps(config))
    return str(d)


CT = {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}}}


def test_plain_checkpoint_has_no_quantization(model_dir):
    assert quant.check_checkpoint(str(model_dir), "cpu") is None
    assert quant.check_checkpoint(str(model_dir), "cpu", "int8_weight_only") is None


@pytest.mark.parametrize("qc, message", [
    ("awq", "quantization_config is str, not an object"),
    ({"bits": 4}, "quantization_config has no quant_method"),
    ({"quant_method": "bitsandbytes_9bit"}, "quant_method 'bitsandbytes_9bit' in .* is not supported; tritonvl loads "
                                            "compressed-tensors, gptq, awq"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors quantization_config has no config_groups"),
    ({**CT, "config_groups": {"g": {"weights": {"type": "nf4"}}}}, "weights type 'nf4' is not int or float"),
])
def test_broken_or_unknown_quantization_configs_are_named(model_dir, tmp_path, qc, message):
    d = _with_config(model_dir, tmp_path, qc)
    with pytest.raises(QuantizationError, match=message):
        quant.check_checkpoint(d, "cpu")


def test_unreadable_config_json(model_dir, tmp_path):
    d = _with_config(model_dir, tmp_path, raw='{"quantization_config": {')
    with pytest.raises(QuantizationError, match="cannot read it as JSON"):
        quant.check_checkpoint(d, "cpu")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_need_no_library(model_dir, tmp_path, method, monkeypatch):
    """tritonvl reads their int32 packing itself (handlers/packed_quant.py): no gptqmodel/AutoAWQ import;
    the configs it cannot run are refused in tests/unit/test_packed_quant.py."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gptqmodel", "awq", "optimum") else real(name, *a))
    q = {"quant_method": method, "bits": 4, "group_size": 128, **({"version": "gemm"} if method == "awq" else {})}
    assert quant.check_checkpoint(_with_config(model_dir, tmp_path, q), "cpu") == q


def test_compressed_tensors_missing_library(model_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "compressed_tensors" else real(name, *a))
    with pytest.raises(QuantizationError, match="needs the compressed-tensors library.*pip install"):
        quant.check_checkpoint(_with_config(model_dir, tmp_path, CT), "cpu")


def test_fp8_checkpoint_on_a_device_without_fp8_and_double_quantization(model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    fp8 = {**CT, "format": "float-quantized",
           "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"},
                                         "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}}
    d = _with_config(model_dir, tmp_path, fp8)
    assert quant.check_checkpoint(d, "cpu")["quant_method"] == "compressed-tensors"  # CPU: dequantized (torch path)
    with pytest.raises(QuantizationError, match="group 'group_0' is FP8 .* device npu:0 has no FP8 matmul"):
        quant.check_checkpoint(d, "npu:0")
    with pytest.raises(QuantizationError, match="already quantized .* set llm.quantization=none"):
        quant.check_checkpoint(d, "cpu", "int8_weight_only")


def test_quantize_decoder_touches_only_the_decoders_linear_layers(model_dir):
    pytest.importorskip("torchao")
    import torch

    from tritonvl.handlers.weights import load_full_model

    model = load_full_model(str(model_dir), "cpu", torch.float32)
    before = quant.describe(model, "none")
    lm = model.model.language_model
    n = quant.quantize_decoder(model, "int8_weight_only", "cpu")
    assert n == 7 * len(lm.layers)  # q, k, v, o, gate, up, down
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in lm.modules() if isinstance(m, torch.nn.Linear))
    assert type(model.lm_head.weight) is torch.nn.Parameter and type(lm.embed_tokens.weight) is torch.nn.Parameter
    assert all(type(p) is torch.nn.Parameter for p in model.model.visual.parameters())
    after = quant.describe(model, "int8_weight_only")
    ratio = after["decoder_linear_bytes"] / before["decoder_linear_bytes"]
    assert 0.25 <= ratio < 0.32, ratio  # int8 weights, fp32 biases, one scale per row
    shrunk = before["decoder_weight_bytes"] - after["decoder_weight_bytes"]
    assert shrunk == before["decoder_linear_bytes"] - after["decoder_linear_bytes"]


def test_tensor_bytes_counts_a_subclass_by_its_parts():
    pytest.importorskip("torchao")
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Linear(64, 32, bias=False)
    assert quant.weight_bytes(lin) == 64 * 32 * 4
    quantize_(lin, Int8WeightOnlyConfig())
    assert quant.weight_bytes(lin) == 64 * 32 + 32 * (4 + 1)  # int8 data, fp32 scale and int8 zero per row


def test_tower_keys_of_a_quantized_tower_are_refused(tmp_path, model_dir):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    with pytest.raises(QuantizationError, match="the vision tower of .* is quantized .*blocks.0.attn.qkv.weight_packed"):
        quant.check_tower_keys(str(d), ["blocks.0.attn.qkv.weight_packed", "blocks.0.attn.qkv.weight_scale"])
    quant.check_tower_keys(str(d), ["blocks.0.attn.qkv.weight", "merger.mlp.0.bias"])


def test_generate_backend_refuses_llm_quantization(model_dir):
    """llm.backend=generate would run the unquantized model: the llm model's load refuses the pair."""
    from types import SimpleNamespace

    from tritonvl.handlers import params
    from tritonvl.handlers.llm.backend import make_backend

    quant.check_backend("generate", "none")
    quant.check_backend("engine", "int8_weight_only")
    args = SimpleNamespace(params=params.typed("llm", backend="generate", quantization="int8_weight_only"),
                           model_dir=lambda: str(model_dir), device=lambda: "cpu")
    with pytest.raises(QuantizationError, match="llm.quantization=int8_weight_only is applied by the engine "
                                                "backend only; llm.backend=generate"):
        make_backend(args)


def test_the_llm_load_refuses_a_broken_quantization_config(model_dir, tmp_path):
    """The llm model's own load (weights.load_full_model) stops on the check before reading weights
    (tritonvl serve runs the same check before tritonserver starts: tests/server/test_quantized.py)."""
    from tritonvl.handlers.weights import load_full_model

    d = _with_config(model_dir, tmp_path, {"bits": 4})
    with pytest.raises(QuantizationError, match="quantization_config has no quant_method"):
        load_full_model(d, "cpu", None)


@pytest.mark.parametrize("sets, qc, message", [
    ({}, {"bits": 4}, "quantization_config has no quant_method"),
    ({}, {"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' in .* is not supported"),
    ({"quantization": "int4_weight_only"}, None, "int4_weight_only has no kernel on device cpu"),
    ({"quantization": "int8_weight_only", "backend": "generate"}, None, "llm.backend=generate"),
    ({"quantization": "int8_weight_only"}, CT, "is already quantized"),
    ({}, {"quant_method": "gptq", "bits": 3}, "gptq bits=3 is not supported"),
    ({}, {"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv' is not supported"),
])
def test_serve_checks_quantization_before_tritonserver(model_dir, tmp_path, sets, qc, message):
    """tritonvl serve's check (launcher.check_quantization) on the repository it would serve: the
    llm model's parameters (with --set) and the checkpoint, on the llm instance's device."""
    if "quantization" in sets:
        pytest.importorskip("torchao")
    if qc == CT:
        pytest.importorskip("compressed_tensors")
    from tritonvl.handlers.tools.launcher import check_quantization, repository_with

    d = _with_config(model_dir, tmp_path, qc)
    repo = repository_with(tmp_path / "repo", {"llm": sets}) if sets else None
    from tritonvl.handlers.tools.repository import default_model_repository

    with pytest.raises(SystemExit, match="tritonvl serve: the llm model would not load: .*" + message):
        check_quantization(d, repo or default_model_repository(), "cpu")
    check_quantization(str(model_dir), default_model_repository(), "cpu")  # a plain checkpoint, defaults
