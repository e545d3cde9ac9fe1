"""scripts/sizing.py: its parameter counts are transformers' own, and docs/DEPLOY.md shows its table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_sizing():
    spec = importlib.util.spec_from_file_location("tritonvl_sizing", ROOT / "scripts" / "sizing.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


sizing = load_sizing()


def hf_config(shape):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         tie_word_embeddings=shape.tie_embeddings),
        vision_config=dict(depth=shape.vision_depth, hidden_size=shape.vision_hidden,
                           intermediate_size=shape.vision_intermediate, num_heads=16,
                           out_hidden_size=shape.vision_out),
        tie_word_embeddings=shape.tie_embeddings)


@pytest.mark.parametrize("shape", sizing.MODELS, ids=lambda s: s.name)
def test_params_equal_transformers_model(shape):
    """The formula counts exactly the parameters transformers builds from the same config (meta device)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config(shape))
    assert sizing.Shape.params(shape) == sum(p.numel() for p in model.parameters())
    assert shape.vision_params() == sum(p.numel() for p in model.model.visual.parameters())


def test_published_totals():
    """Totals as published (Hugging Face shows 3.75B, 8.29B, 33.5B, 73.4B; a published breakdown of
    the 7B gives its vision tower 676.55M): a mistyped config value shows here."""
    assert [round(s.params() / 1e9, 2) for s in sizing.MODELS] == [3.75, 8.29, 33.45, 73.41]
    assert round(sizing.MODELS[1].vision_params() / 1e6, 2) == 676.55


def test_config_json_round_trip(tmp_path):
    """A saved config.json (transformers 5 layout) reads back to the same shape."""
    shape = sizing.MODELS[0]
    hf_config(shape).save_pretrained(tmp_path)
    read = sizing.shape_from_config(str(tmp_path / "config.json"))
    assert read.params() == shape.params()
    assert read.kv_bytes_per_token(2) == shape.kv_bytes_per_token(2) == 2 * 36 * 2 * 128 * 2


def test_verdicts():
    by_name = {s.name: s for s in sizing.MODELS}
    assert sizing.fit(by_name["Qwen2.5-VL-72B"], 139.8)["verdict"] == "no: weights + reserve exceed the device"
    assert sizing.fit(by_name["Qwen2.5-VL-72B"], 79.6)["verdict"] == "no: weights exceed the device"
    assert sizing.fit(by_name["Qwen2.5-VL-32B"], 64.0)["verdict"] == "no: weights + reserve exceed the device"
    assert sizing.fit(by_name["Qwen2.5-VL-32B"], 79.6)["verdict"] == "yes"
    assert sizing.fit(by_name["Qwen2.5-VL-7B"], 22.5)["verdict"] == "yes"


def test_doc_table_is_current():
    assert sizing.main(["--check", str(ROOT / "docs" / "DEPLOY.md")]) == 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_config_of_any_family_counts_its_weights(tmp_path, family):
    """--config on another family: the count equals the tensors a saved checkpoint holds (experts
    included), and KV uses the text config's own head_dim (Qwen3's is not hidden / heads)."""
    from safetensors import safe_open

    from tritonvl.handlers.modelinfo import load_model_info
    from tritonvl.handlers.tiny_model import PRESETS, build_tiny_model

    model_dir = build_tiny_model(tmp_path / family, PRESETS[family])
    counted = sizing.count_config(str(model_dir / "config.json"))
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        stored = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert counted.params() == stored
    info = load_model_info(model_dir)
    assert counted.kv_bytes_per_token(2) == info.kv_bytes_per_token(2)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("shape", sizing.MODELS[:2], ids=lambda s: s.name)
def test_linear_shapes_are_the_decoders_linear_weights(shape):
    """What a quantized decoder stores in fewer bits: exactly the weights of the decoder layers'
    nn.Linear modules of transformers' model (meta device); --config counts the same."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config(shape))
    layers = model.model.language_model.layers
    want = sorted(tuple(m.weight.shape) for m in layers.modules() if isinstance(m, torch.nn.Linear))
    assert sorted(shape.linear_shapes()) == want


def test_quantized_weights():
    """72B: 8-bit decoder weights 71.4 GiB (an H200 or an 80 GB GPU), 4-bit 39.9 GiB (also a 64 GB
    Ascend 910B); a 4-bit weight is 4 bits + a 16-bit scale and a 4-bit zero per 128."""
    s72 = {s.name: s for s in sizing.MODELS}["Qwen2.5-VL-72B"]
    gib = {bits: sizing.weight_bytes(s72, 2, bits) / sizing.GIB for bits in (16, 8, 4)}
    assert [round(gib[b], 1) for b in (16, 8, 4)] == [136.7, 71.4, 39.9]
    linear = sum(o * i for o, i in s72.linear_shapes())
    assert sizing.weight_bytes(s72, 2, 4) == (s72.params() - linear) * 2 + linear // 2 + linear // 128 * 2 + \
        linear // 128 // 2
    assert sizing.fit(s72, 139.8, bits=8)["verdict"] == "yes"
    assert sizing.fit(s72, 64.0, bits=8)["verdict"] == "no: weights exceed the device"
    assert sizing.fit(s72, 64.0, bits=4)["verdict"] == "yes"


def test_config_weight_bits(tmp_path, capsys):
    """--config --weight-bits 4 on a saved config: the same bytes as the published shape's formula."""
    import json

    shape = sizing.MODELS[0]
    hf_config(shape).save_pretrained(tmp_path)
    assert sizing.main(["--config", str(tmp_path / "config.json"), "--weight-bits", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights_gib"] * sizing.GIB == pytest.approx(sizing.weight_bytes(shape, 2, 4))
