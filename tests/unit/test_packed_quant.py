"""GPTQ and AWQ (gemm) checkpoints, read by handlers/packed_quant.py (no GPTQ/AWQ library installs with
the server's pins: docs/QUANTIZATION.md). The checkpoints are made by the reference packer in
tests/quant_checkpoints.py (written from the formats' documentation), which also writes the
fake-quantized fp32 model (scale * (code - zero), computed from the codes before packing): the oracle.
load_full_model's logits equal the oracle's bit for bit (so greedy tokens do: tests/server/test_quantized.py
serves GPTQ and AWQ through tritonserver against generate() on the oracle), the decoder's linear
layers stay packed in memory, the tower loads alone in fp32, and every config tritonvl cannot run
stops the load with a message naming it."""

from __future__ import annotations

import json
import shutil

import pytest
from quant_checkpoints import make_packed  # tests/ is on the path (tests/conftest.py)

CASES = {
    "awq": {"method": "awq"},
    "gptq_sym": {"method": "gptq", "sym": True},  # v1 zeros (zero - 1), as Qwen's GPTQ-Int4 releases
    "gptq_asym_act_order_v2": {"method": "gptq", "desc_act": True, "v1": False},
    "gptq_asym_v1": {"method": "gptq"},  # a zero of 0 is stored as 15 (v1's wrap-around)
    "gptq_8bit": {"method": "gptq", "bits": 8, "sym": True},
}


@pytest.fixture(scope="module", params=list(CASES))
def packed(request, model_dir, tmp_path_factory):
    """(name, the packed checkpoint, the fake-quantized fp32 checkpoint)"""
    d, ref = make_packed(model_dir, tmp_path_factory.mktemp(request.param) / request.param, **CASES[request.param])
    return request.param, d, ref


@pytest.fixture(scope="module")
def fp32(model_dir):
    """The unquantized model: (its decoder's linear bytes, the model)"""
    import torch

    from tritonvl.handlers import quant
    from tritonvl.handlers.weights import model_class

    model = model_class(str(model_dir), 2).from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return quant.describe(model, "none")["decoder_linear_bytes"], model


def test_logits_equal_the_fake_quantized_model_and_layers_stay_packed(packed, fp32):
    import torch

    from tritonvl.handlers import quant
    from tritonvl.handlers.packed_quant import PackedLinear
    from tritonvl.handlers.weights import load_full_model, model_class

    name, d, ref = packed
    model = load_full_model(str(d), "cpu", torch.float32)
    layers = [m for m in model.model.language_model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 7 * model.config.text_config.num_hidden_layers
    assert not any(type(m) is torch.nn.Linear for m in model.model.language_model.modules())
    (fp32_bytes, fp), held = fp32, quant.describe(model, "none")
    ratio = held["decoder_linear_bytes"] / fp32_bytes
    print(f"{name}: decoder linear layers {held['decoder_linear_bytes']} bytes in memory, fp32 {fp32_bytes} ({ratio:.3f})")
    assert held["quantization"] == CASES[name]["method"]
    # 4-bit: codes + fp16 scales per 32 + zeros (+ g_idx) ~0.15; 8-bit ~0.28
    assert (0.27 <= ratio < 0.3) if CASES[name].get("bits") == 8 else (0.13 <= ratio < 0.17), ratio
    oracle = model_class(str(ref), 2).from_pretrained(str(ref), dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert torch.equal(got, oracle(input_ids=ids).logits)
        assert not torch.equal(got, fp(input_ids=ids).logits)  # the quantization is there
    for module in layers:  # the packed tensors are what forward reads, not a cached weight
        assert module.qweight.dtype == torch.int32 and module.scales.dtype == torch.float16


def test_the_tower_loads_alone_in_32_bit(model_dir, tmp_path, fp32):
    import torch

    from tritonvl.handlers.weights import load_visual

    d, _ = make_packed(model_dir, tmp_path / "awq", method="awq")
    visual = load_visual(str(d), "cpu", torch.float32)
    fp = fp32[1].model.visual
    assert all(p.dtype == torch.float32 for p in visual.parameters())
    assert all(torch.equal(a, b) for a, b in zip(visual.state_dict().values(), fp.state_dict().values()))


def test_a_quantized_tower_is_refused(model_dir, tmp_path):
    import torch

    from tritonvl.handlers.quant import QuantizationError
    from tritonvl.handlers.weights import load_visual

    d, _ = make_packed(model_dir, tmp_path / "tower", method="gptq", sym=True, quantize_tower=True)
    with pytest.raises(QuantizationError, match=r"the vision tower of .* is quantized \(gptq: blocks\.0\.attn\..*"
                       r"AWQ: modules_to_not_convert=\[.visual.\]\)"):
        load_visual(str(d), "cpu", torch.float32)


def _with_config(model_dir, tmp_path, q):
    d = tmp_path / "ckpt"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = q
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("q, message", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq bits=3 is not supported; tritonvl unpacks 4, 8-bit"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "gptq checkpoint_format 'marlin' is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "gptq group_size 0 is not a positive integer or -1"),
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "awq bits=8 is not supported; tritonvl unpacks 4-bit AWQ"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": False}, "awq zero_point=false is not supported"),
])
def test_configs_tritonvl_cannot_run_are_refused(model_dir, tmp_path, q, message):
    from tritonvl.handlers.quant import QuantizationError, check_serving

    d = _with_config(model_dir, tmp_path, q)
    with pytest.raises(QuantizationError, match=f"{d}/config.json: " + message.replace("(", r"\(")):
        check_serving(str(d), "cpu")


def test_gptq_and_awq_are_refused_on_ascend(model_dir, tmp_path):
    from tritonvl.handlers.quant import QuantizationError, check_checkpoint

    d = _with_config(model_dir, tmp_path, {"quant_method": "awq", "bits": 4, "version": "gemm"})
    with pytest.raises(QuantizationError, match="quant_method 'awq': .* not tried on device npu:0"):
        check_checkpoint(str(d), "npu:0")


def test_a_checkpoint_that_does_not_fit_is_refused(model_dir, tmp_path):
    """A group size that does not divide the layer, and a packed tensor that fits no layer."""
    import torch
    from safetensors.torch import load_file, save_file

    from tritonvl.handlers.packed_quant import PackedConfigError
    from tritonvl.handlers.weights import load_full_model

    d, _ = make_packed(model_dir, tmp_path / "gptq", method="gptq", sym=True)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64  # 96 input columns
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackedConfigError, match="gptq group_size 64 does not divide in_features 96"):
        load_full_model(str(d), "cpu", torch.float32)
    config["quantization_config"]["group_size"] = 32
    (d / "config.json").write_text(json.dumps(config))
    state = load_file(str(d / "model.safetensors"))
    state["model.layers.0.mlp.extra_proj.qweight"] = torch.zeros(4, 8, dtype=torch.int32)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PackedConfigError, match=r"1 tensors of .* fit no part of the model: \['model.layers.0.mlp.extra_proj"):
        load_full_model(str(d), "cpu", torch.float32)


def test_a_sharded_checkpoint_with_its_own_lm_head(model_dir, tmp_path):
    """As the published 7B+ releases: several safetensors files behind model.safetensors.index.json,
    lm_head stored (tie_word_embeddings false). Logits equal the oracle's saved the same way."""
    import torch
    from safetensors.torch import load_file, save_file

    from tritonvl.handlers.weights import load_full_model, model_class

    d, ref = make_packed(model_dir, tmp_path / "awq", method="awq")
    for directory in (d, ref):
        state = load_file(str(directory / "model.safetensors"))
        state["lm_head.weight"] = state["model.embed_tokens.weight"].flip(0).contiguous()
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for file, names in shards.items():
            save_file({k: state[k] for k in names}, str(directory / file), metadata={"format": "pt"})
        (directory / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        config = json.loads((directory / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (directory / "config.json").write_text(json.dumps(config))
    model = load_full_model(str(d), "cpu", torch.float32)
    oracle = model_class(str(ref), 2).from_pretrained(str(ref), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight, oracle.lm_head.weight)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, oracle(input_ids=ids).logits)
