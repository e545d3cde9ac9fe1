"""llm parameter cpu_linear: the decoder's plain fp32 CPU linear layers run from oneDNN's packed copy
(handlers/engine/onednn.py), quantized or other-dtype layers are left alone, and the engine's greedy
output still equals generate()."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tritonvl.handlers.engine import onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


def _tree() -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.attn = nn.Module()
    root.attn.q = nn.Linear(64, 64, bias=True)
    root.attn.o = nn.Linear(64, 64, bias=False)
    root.bf16 = nn.Linear(64, 32).to(torch.bfloat16)
    root.scheme = nn.Linear(64, 32)
    root.scheme.quantization_scheme = object()  # compressed-tensors' marker: its forward is not F.linear
    return root


def test_plain_fp32_linears_are_swapped_and_compute_the_same():
    root = _tree()
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        want = {n: getattr(root.attn, n)(x) for n in ("q", "o")}
        assert onednn.pack_linears(root) == 2
        for n in ("q", "o"):
            m = getattr(root.attn, n)
            assert isinstance(m, onednn.PackedLinear) and not hasattr(m, "weight")  # the original is let go
            torch.testing.assert_close(m(x), want[n], rtol=1e-5, atol=1e-5)
    assert type(root.bf16) is nn.Linear and type(root.scheme) is nn.Linear  # left alone


def _attention_and_mlp() -> nn.Module:
    torch.manual_seed(1)
    root = nn.Module()
    root.self_attn = nn.Module()
    for name, out, bias in (("q_proj", 64, True), ("k_proj", 16, True), ("v_proj", 16, True), ("o_proj", 64, False)):
        setattr(root.self_attn, name, nn.Linear(64, out, bias=bias))
    root.mlp = nn.Module()
    for name, shape in (("gate_proj", (64, 96)), ("up_proj", (64, 96)), ("down_proj", (96, 64))):
        setattr(root.mlp, name, nn.Linear(*shape, bias=False))
    return root


def test_siblings_reading_one_input_run_as_one_product():
    """q/k/v and gate/up become members of one packed product each; every member equals its own layer,
    in any call order, for a new input, and called twice; nothing is cached after the last part."""
    root = _attention_and_mlp()
    names = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
    layers = {k: getattr(getattr(root, k[0]), k[1]) for k in names}
    xs = [torch.randn(3, 64), torch.randn(1, 2, 64), torch.randn(5, 96)]
    with torch.inference_mode():
        want = {k: [m(x) for x in xs if x.shape[-1] == m.in_features] for k, m in layers.items()}
        assert onednn.pack_linears(root) == 7
        got = {k: getattr(getattr(root, k[0]), k[1]) for k in names}
        assert {k[1] for k, m in got.items() if isinstance(m, onednn.FusedMember)} == \
            {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
        assert got["self_attn", "q_proj"].product is got["self_attn", "v_proj"].product
        assert got["self_attn", "q_proj"].product is not got["mlp", "up_proj"].product
        for order in (names, list(reversed(names))):
            for k in order:
                m = got[k]
                inputs = [x for x in xs if x.shape[-1] == m.in_features]
                for x, w in zip(inputs, want[k]):
                    torch.testing.assert_close(m(x), w, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(m(x), w, rtol=1e-5, atol=1e-5)  # the same member again
        product = got["self_attn", "k_proj"].product
        x = xs[0]
        got["self_attn", "q_proj"](x), got["self_attn", "k_proj"](x)
        assert product._x is x  # v's part is still waiting
        got["self_attn", "v_proj"](x)
        assert product._x is None and product._parts == ()  # all taken: the activation is let go


def test_a_quantized_tensor_subclass_weight_is_left_alone():
    """torchao keeps nn.Linear and puts a tensor subclass in its weight: not a plain fp32 layer."""

    class Marked(torch.Tensor):
        pass

    lin = nn.Linear(16, 16)
    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(Marked), requires_grad=False)
    assert not onednn.is_plain_fp32(lin)
    assert onednn.is_plain_fp32(nn.Linear(16, 16))


def test_a_pack_that_disagrees_is_not_used(monkeypatch):
    monkeypatch.setattr(onednn, "linear", lambda x, p, b: torch.zeros(x.shape[0], 64))
    root = _tree()
    assert onednn.pack_linears(root) == 0 and type(root.attn.q) is nn.Linear


def test_the_engine_runs_packed_linears_and_equals_generate(model_dir):
    """Default: every decoder linear is a PackedLinear and the greedy tokens equal generate()'s;
    cpu_linear=torch keeps nn.Linear."""
    from tests.helpers import assert_offline_equals_generate, make_image
    from tritonvl.handlers.tools.offline import OfflinePipeline

    def kinds(**kw) -> set:
        with OfflinePipeline(str(model_dir), device="cpu", dtype="float32", kv_cache_bytes=1 << 24, **kw) as pipe:
            return {type(m).__name__ for n, m in pipe.engine.runner.lm.layers.named_modules()
                    if n.endswith(("_proj",))}

    assert kinds() == {"PackedLinear", "FusedMember"}  # o/down alone; q/k/v and gate/up as fused products
    assert kinds(cpu_linear="torch") == {"Linear"}
    specs = [("Say something.", [], 12), ("What is shown?", [make_image(200, 150, 4)], 12)]
    assert_offline_equals_generate(model_dir, specs)


def test_packed_linear_compiles_as_one_graph_and_computes_the_same():
    """Under torch.compile a PackedLinear calls oneDNN through the tritonvl::onednn_linear op (inductor
    cannot trace oneDNN's packed tensor): fullgraph, the same values as the eager call."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    root = nn.Module()
    root.lin = lin
    assert onednn.pack_linears(root, fuse=False) == 1
    packed = root.lin
    x = torch.randn(3, 64)

    def f(x):
        return torch.nn.functional.silu(packed(x)) * 2.0

    with torch.inference_mode():
        want = f(x)
        got = torch.compile(f, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(onednn.linear_op(x, packed.handle, 48), packed(x))


def test_the_compiled_op_registry_lets_a_dropped_model_go():
    import gc

    def build() -> int:
        root = nn.Module()
        root.lin = nn.Linear(16, 8)
        assert onednn.pack_linears(root, fuse=False) == 1
        assert onednn._LAYERS[root.lin.handle] is root.lin
        return root.lin.handle

    handle = build()
    gc.collect()
    assert handle not in onednn._LAYERS  # nothing keeps a dropped model's packed weights
