"""The sharding math of handlers/engine/parallel.py: a decoder layer split over two gloo ranks (in
processes of their own) gives the unsharded layer's output; sizes that do not divide are refused
naming the numbers; each instance's devices (handlers/devices.py tp_devices)."""

from __future__ import annotations

import pytest
import torch

from tritonvl.handlers.devices import tp_devices
from tritonvl.handlers.engine.parallel import COLWISE, ROWWISE, check_size

TEXT = {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 1, "num_attention_heads": 6,
        "num_key_value_heads": 2, "vocab_size": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                        "mrope_section": [2, 3, 3]}}


def _layer_and_input(seed: int = 0):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLDecoderLayer,
        Qwen2_5_VLRotaryEmbedding,
    )

    torch.manual_seed(seed)
    config = Qwen2_5_VLTextConfig(**TEXT)
    config._attn_implementation = "sdpa"
    layer = Qwen2_5_VLDecoderLayer(config, 0).eval()
    for p in layer.parameters():  # not the init's small values: every slice must matter
        p.data.normal_(0, 0.3)
    x = torch.randn(1, 7, config.hidden_size)
    pos = torch.arange(7)[None, None].expand(3, 1, 7)
    emb = Qwen2_5_VLRotaryEmbedding(config)(x, pos)
    return layer, x, emb


def test_two_gloo_ranks_give_the_unsharded_layer():
    """Each rank (a thread with its own gloo group over loopback) shards a copy of the layer; both
    give the unsharded layer's output (the all-reduces after o_proj and down_proj included)."""
    import copy
    import os
    import threading
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from tritonvl.handlers.engine.parallel import RowParallelLinear, shard_decoder

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    layer, x, emb = _layer_and_input()
    with torch.inference_mode():
        want = layer(x, position_embeddings=emb)
    store, got, errors = dist.HashStore(), {}, []
    copies = [copy.deepcopy(layer) for _ in range(2)]  # here: the threads share torch's random state

    def rank(r: int) -> None:
        try:
            group = dist.ProcessGroupGloo(dist.PrefixStore("tp", store), r, 2, timedelta(seconds=60))
            mine = copies[r]
            shard_decoder(SimpleNamespace(layers=[mine]), r, 2, group)
            attn, heads = mine.self_attn, TEXT["num_attention_heads"]
            head_dim = TEXT["hidden_size"] // heads
            assert attn.q_proj.weight.shape[0] == heads // 2 * head_dim
            assert attn.k_proj.weight.shape[0] == TEXT["num_key_value_heads"] // 2 * head_dim
            assert isinstance(attn.o_proj, RowParallelLinear) and isinstance(mine.mlp.down_proj, RowParallelLinear)
            with torch.inference_mode():
                got[r] = mine(x, position_embeddings=emb)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for r in range(2):
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-5)


def test_the_plan_is_transformers_own():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    plan = {k.removeprefix("layers.*."): v for k, v in Qwen2_5_VLTextConfig.base_model_tp_plan.items()}
    assert {k for k, v in plan.items() if v == "colwise"} == set(COLWISE)
    assert {k for k, v in plan.items() if v == "rowwise"} == set(ROWWISE)


def test_sizes_that_do_not_divide_are_refused_with_the_numbers():
    check_size("qwen2_5_vl", 6, 2, 2)
    check_size("qwen2_5_vl", 6, 2, 1)
    with pytest.raises(ValueError, match="tensor_parallel_size 4 does not divide the model's num_attention_heads 6 "
                                         "and num_key_value_heads 2"):
        check_size("qwen2_5_vl", 6, 2, 4)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's num_key_value_heads 2"):
        check_size("qwen2_5_vl", 6, 2, 3)
    with pytest.raises(ValueError, match="Qwen3-VL-MoE"):
        check_size("qwen3_vl_moe", 4, 2, 2)
    with pytest.raises(ValueError, match="quantization"):
        check_size("qwen2_5_vl", 4, 2, 2, "int8_weight_only")


def test_each_instance_gets_devices_of_its_own():
    assert tp_devices("cpu", 2) == ["cpu", "cpu"]
    assert tp_devices("cuda:0", 1) == ["cuda:0"]
    # KIND_GPU: Triton's GPU for the instance and the next ones (gpus: [0] and [2] for two instances)
    assert tp_devices("cuda:2", 2, "KIND_GPU", "llm_1") == ["cuda:2", "cuda:3"]
    # KIND_MODEL + device cuda: instance k takes k*N .. k*N+N-1
    assert tp_devices("cuda:0", 2, "KIND_MODEL", "llm_1") == ["cuda:2", "cuda:3"]
    assert tp_devices("npu:0", 4, "KIND_MODEL", "llm_0") == ["npu:0", "npu:1", "npu:2", "npu:3"]
    assert tp_devices("npu:4", 2, "KIND_MODEL", "llm_1", "4,5,6,7") == ["npu:6", "npu:7"]
    with pytest.raises(ValueError, match="only 2 are listed"):
        tp_devices("npu:4", 2, "KIND_MODEL", "llm_1", "4,5")


def test_sizing_per_device_with_tensor_parallelism():
    """scripts/sizing.py fit_tp: size 1 is fit(); N splits the decoder layers and the KV per token."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "sizing.py"
    spec = importlib.util.spec_from_file_location("tritonvl_sizing_tp", path)
    sizing = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sizing  # its dataclasses look their module up
    spec.loader.exec_module(sizing)
    m72 = next(s for s in sizing.MODELS if s.name == "Qwen2.5-VL-72B")
    one, two = sizing.fit(m72, 139.8), sizing.fit_tp(m72, 139.8, 1)
    assert one["weights_gib"] == pytest.approx(two["weights_gib_per_device"]) and one["verdict"] == two["verdict"]
    tp2 = sizing.fit_tp(m72, 139.8, 2)
    whole = (m72.params() - m72.layer_params()) * 2 / 2**30
    assert tp2["weights_gib_per_device"] == pytest.approx(whole + (one["weights_gib"] - whole) / 2)
    assert tp2["kv_kib_per_token_per_device"] == pytest.approx(one["kv_kib_per_token"] / 2)
    assert one["verdict"] != "yes" and tp2["verdict"] == "yes"
