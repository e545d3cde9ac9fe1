"""compressed-tensors checkpoints (W8A8 int8 dynamic per-token, FP8 dynamic) through the in-process
engine (OfflinePipeline: paged attention, prefix cache, the sampler) equal transformers' generate()
on the same checkpoint, token for token; the vision tower of such a checkpoint loads alone (it is
kept in 32-bit), and a quantized tower is refused. The decoder's linear layers stay compressed in
memory (int8 / fp8 weights, ~0.26 of fp32's bytes) and dequantize per forward to exactly the weights
the library's decompress_model gives. W4A16 goes through a real tritonserver in
tests/server/test_quantized.py."""

from __future__ import annotations

import pytest

pytest.importorskip("compressed_tensors", reason="pip install 'tritonvl[quant]'")

from quant_checkpoints import make_compressed  # noqa: E402  (tests/ is on the path: tests/conftest.py)

from tests.helpers import assert_offline_equals_generate, make_image  # noqa: E402


@pytest.fixture(scope="module", params=["W8A8", "FP8_DYNAMIC"])
def checkpoint(request, model_dir, tmp_path_factory):
    return make_compressed(model_dir, tmp_path_factory.mktemp(request.param) / request.param, request.param)


def test_engine_equals_generate(checkpoint):
    img = make_image(200, 150, seed=1)
    specs = [("Tell me a story about a lighthouse.", [], 8), ("What is in the picture?", [img], 8),
             ("Compare the two images.", [make_image(300, 120, seed=4), make_image(64, 200, seed=5)], 8),
             ("What is in the picture?", [img], 8)]  # the same prompt again: from the prefix cache
    assert_offline_equals_generate(checkpoint, specs)


def test_the_tower_loads_alone_in_32_bit(checkpoint):
    import torch

    from tritonvl.handlers.weights import load_visual

    visual = load_visual(str(checkpoint), "cpu", torch.float32)
    assert all(p.dtype == torch.float32 for p in visual.parameters())


def test_a_quantized_tower_is_refused(model_dir, tmp_path):
    import torch

    from tritonvl.handlers.quant import QuantizationError
    from tritonvl.handlers.weights import load_visual

    d = make_compressed(model_dir, tmp_path / "tower", "W8A8", quantize_tower=True)
    with pytest.raises(QuantizationError, match="the vision tower of .* is quantized \\(compressed-tensors"):
        load_visual(str(d), "cpu", torch.float32)


def test_layers_stay_compressed_and_dequantize_per_forward(checkpoint, model_dir):
    """load_full_model keeps each decoder linear layer's int8 / fp8 weight and its scales (~0.26 of
    fp32's linear bytes); its forward's logits are bitwise those of the library's own path
    (decompress_model at the first forward, as generate() runs it) and of decompression at load."""
    import torch

    from tritonvl.handlers import quant
    from tritonvl.handlers.weights import load_full_model, model_class

    fp32 = quant.describe(model_class(str(model_dir), 2).from_pretrained(str(model_dir), dtype=torch.float32),
                          "none")["decoder_linear_bytes"]
    model = load_full_model(str(checkpoint), "cpu", torch.float32)
    held = quant.describe(model, "none")["decoder_linear_bytes"]
    print(f"{checkpoint.name}: decoder linear layers {held} bytes in memory, fp32 {fp32} ({held / fp32:.3f})")
    assert 0.25 <= held / fp32 < 0.3, (held, fp32)
    layers = [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(m.weight.dtype in (torch.int8, torch.float8_e4m3fn) for m in layers)
    library = model_class(str(checkpoint), 2).from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    at_load = model_class(str(checkpoint), 2).from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    assert quant.prepare_loaded(at_load, per_layer=False) == 0
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert torch.equal(got, library(input_ids=ids).logits)
        assert torch.equal(got, at_load(input_ids=ids).logits)
    assert all(m.weight.dtype in (torch.int8, torch.float8_e4m3fn) for m in layers)  # still compressed
