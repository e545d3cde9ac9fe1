"""Attention backends: selection, StepMeta forms, and the kernel backends' argument contract.

No CUDA or Ascend device here, so flash-attn's ``flash_attn_varlen_func`` (paged) and torch_npu's
``npu_fused_infer_attention_score`` (paged decode, BSH) are replaced by slow pure-torch models of
their documented behaviour, including the checks the real kernels make on their arguments. These
tests prove our side of the contract (block tables, cumulative lengths, layouts, causal alignment),
not the kernels: the engine re-checks every kernel backend against sdpa on the real device at
start-up (``attention.select`` runs ``self_check``).
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from tritonvl.handlers.engine import attention as attn


def _expand(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def fake_flash_varlen(strict_dtype: bool = True, top_left: bool = False):
    """flash_attn_varlen_func with block_table: q [total_q, H, D]; k/v [num_blocks, page, KVH, D];
    cu_seqlens int32; causal mask aligned bottom-right (``top_left`` models a wrong alignment)."""

    def fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
           softmax_scale=None, causal=False, block_table=None, **kwargs):
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert block_table is not None and block_table.dtype == torch.int32 and block_table.stride(-1) == 1
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        assert k.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
        if strict_dtype:
            assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
        heads, dim = q.shape[1], q.shape[2]
        scale = softmax_scale or 1.0 / math.sqrt(dim)
        out = torch.zeros_like(q)
        page = k.shape[1]
        for b in range(cu_seqlens_q.numel() - 1):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            klen = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
            assert q1 - q0 <= max_seqlen_q and klen <= max_seqlen_k
            nblk = -(-klen // page)
            kb = k[block_table[b, :nblk].long()].reshape(-1, *k.shape[2:])[:klen]  # [klen, KVH, D]
            vb = v[block_table[b, :nblk].long()].reshape(-1, *v.shape[2:])[:klen]
            qs = q[q0:q1].float().transpose(0, 1)  # [H, n, D]
            ks, vs = _expand(kb.float().transpose(0, 1)[None], heads)[0], _expand(vb.float().transpose(0, 1)[None], heads)[0]
            s = qs @ ks.transpose(-1, -2) * scale  # [H, n, klen]
            n = q1 - q0
            if causal:
                shift = 0 if top_left else klen - n
                allowed = torch.arange(klen)[None, :] <= (torch.arange(n)[:, None] + shift)
                s = s.masked_fill(~allowed, float("-inf"))
            out[q0:q1] = (s.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
        return out

    return fn


def fake_npu_fused(strict_dtype: bool = True):
    """npu_fused_infer_attention_score, paged incremental branch: query [B, 1, H*D] (BSH), key/value
    cache [num_blocks, block_size, KVH*D], block_table int32 [B, W], actual_seq_lengths_kv per batch."""

    def fn(query, key, value, *, block_table=None, actual_seq_lengths_kv=None, num_heads=1,
           num_key_value_heads=0, input_layout="BSH", block_size=0, scale=1.0, **kwargs):
        assert input_layout == "BSH" and query.dim() == 3 and query.shape[1] == 1 and query.is_contiguous()
        assert block_table is not None and block_table.dtype == torch.int32
        assert key.dim() == 3 and key.shape[1] == block_size and block_size % 128 == 0
        assert isinstance(actual_seq_lengths_kv, list) and len(actual_seq_lengths_kv) == query.shape[0]
        if strict_dtype:
            assert query.dtype in (torch.float16, torch.bfloat16)
        kvh = num_key_value_heads or num_heads
        dim = query.shape[-1] // num_heads
        out = torch.zeros_like(query)
        for b, klen in enumerate(actual_seq_lengths_kv):
            nblk = -(-klen // block_size)
            kb = key[block_table[b, :nblk].long()].reshape(-1, kvh, dim)[:klen].float()
            vb = value[block_table[b, :nblk].long()].reshape(-1, kvh, dim)[:klen].float()
            q = query[b, 0].float().view(num_heads, dim)
            kb, vb = kb.repeat_interleave(num_heads // kvh, dim=1), vb.repeat_interleave(num_heads // kvh, dim=1)
            s = torch.einsum("hd,khd->hk", q, kb) * scale
            out[b, 0] = torch.einsum("hk,khd->hd", s.softmax(-1), vb).reshape(-1).to(query.dtype)
        return out, None

    return fn


@pytest.fixture
def fake_kernels(monkeypatch):
    """Install fake flash_attn / torch_npu modules; return a setter to swap their functions."""
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_varlen_func = fake_flash_varlen()
    npu = types.ModuleType("torch_npu")
    npu.npu_fused_infer_attention_score = fake_npu_fused()
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "torch_npu", npu)
    return flash, npu


def test_auto_on_cpu_is_sdpa_and_says_why():
    chosen = attn.select("auto", "cpu", torch.float32, 4, 2, 64)
    backend, why = chosen.backend, chosen.why
    assert backend.name == "sdpa" and chosen.block_size == 16
    assert "flash_attn runs on cuda" in why and "triton runs on cuda" in why and "npu runs on npu" in why


def test_explicit_backend_that_cannot_run_names_the_reason():
    with pytest.raises(ValueError, match="runs on cuda, not cpu"):
        attn.select("flash_attn", "cpu", torch.float32, 4, 2, 64)
    with pytest.raises(ValueError, match="expected auto or one of"):
        attn.select("xformers", "cpu", torch.float32, 4, 2, 64)


def test_kernel_constraints_are_reported(fake_kernels, monkeypatch):
    fa = attn.BACKENDS["flash_attn"]
    monkeypatch.setitem(attn.BACKENDS, "flash_attn", attn.Backend(**{**fa.__dict__, "device_types": ("cpu",)}))
    fa = attn.BACKENDS["flash_attn"]
    assert attn.unavailable(fa, "cpu", torch.bfloat16, 64) is None
    assert "multiple of 256" in attn.unavailable(fa, "cpu", torch.bfloat16, 64, block_size=16)
    assert "float16 or bfloat16" in attn.unavailable(fa, "cpu", torch.float32, 64)
    assert "head_dim" in attn.unavailable(fa, "cpu", torch.bfloat16, 12)
    chosen = attn.select("auto", "cpu", torch.bfloat16, 4, 2, 64)
    assert chosen.backend.name == "flash_attn" and chosen.why == "auto" and chosen.block_size == 256
    # a block size the kernel cannot take makes auto fall back, and an explicit request fail
    assert attn.select("auto", "cpu", torch.bfloat16, 4, 2, 64, block_size=16).backend.name == "sdpa"
    with pytest.raises(ValueError, match="multiple of 256"):
        attn.select("flash_attn", "cpu", torch.bfloat16, 4, 2, 64, block_size=16)


def test_missing_package_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    fa = attn.BACKENDS["flash_attn"]
    monkeypatch.setitem(attn.BACKENDS, "flash_attn", attn.Backend(**{**fa.__dict__, "device_types": ("cpu",)}))
    reason = attn.unavailable(attn.BACKENDS["flash_attn"], "cpu", torch.bfloat16, 64)
    assert reason and reason.startswith("flash_attn:")


def test_build_meta_paged_form():
    fa = attn.BACKENDS["flash_attn"]
    cache = torch.zeros(2, 1, 6 * 256, 2, 8)
    parts = [attn.SeqStep(0, 256 + 3, 5, [4, 1, 7]), attn.SeqStep(5, 10, 1, [2])]
    meta = attn.build_meta(fa, cache, 256, parts, "cpu")
    assert meta.cu_q.tolist() == [0, 5, 6] and meta.cu_k.tolist() == [0, 264, 275]
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.tolist() == [[4, 1], [2, 0]]
    assert (meta.max_q, meta.max_k) == (5, 264)
    assert meta.slot_mapping.tolist() == [256 + 3 + i for i in range(5)] + [2 * 256 + 10]
    assert meta.prefills == [] and meta.decode_slots is None  # no gathered form for flash


def test_build_meta_hybrid_form_for_npu():
    npu = attn.BACKENDS["npu"]
    cache = torch.zeros(2, 1, 4 * 128, 2, 8)
    parts = [attn.SeqStep(0, 0, 4, [3]), attn.SeqStep(4, 130, 1, [0, 2])]
    meta = attn.build_meta(npu, cache, 128, parts, "cpu")
    assert len(meta.prefills) == 1 and meta.prefills[0].ctx_slots.tolist() == [384, 385, 386, 387]
    assert meta.decode_rows.tolist() == [4] and meta.kv_lens == [131]
    assert meta.block_tables.tolist() == [[0, 2]] and meta.decode_slots is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_flash_backend_matches_sdpa(fake_kernels, dtype, heads, kv_heads):
    flash, _ = fake_kernels
    flash.flash_attn_varlen_func = fake_flash_varlen(strict_dtype=dtype != torch.float32)
    fa = attn.BACKENDS["flash_attn"]
    assert attn.self_check(fa, attn.make_flash_attn(), "cpu", dtype, heads, kv_heads, 16, 256) is None


def test_wrong_causal_alignment_is_caught(fake_kernels):
    flash, _ = fake_kernels
    flash.flash_attn_varlen_func = fake_flash_varlen(top_left=True)
    fa = attn.BACKENDS["flash_attn"]
    problem = attn.self_check(fa, attn.make_flash_attn(), "cpu", torch.bfloat16, 4, 2, 16, 256)
    assert problem and "differs from sdpa" in problem


def test_kernel_error_is_caught(fake_kernels):
    flash, _ = fake_kernels
    flash.flash_attn_varlen_func = fake_flash_varlen()
    fa = attn.BACKENDS["flash_attn"]
    # float32 into a kernel that takes only fp16/bf16: reported, not raised
    problem = attn.self_check(fa, attn.make_flash_attn(), "cpu", torch.float32, 4, 2, 16, 256)
    assert problem and "failed on a test step" in problem


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_npu_backend_matches_sdpa(fake_kernels, heads, kv_heads):
    nb = attn.BACKENDS["npu"]
    assert attn.self_check(nb, attn.make_npu(), "cpu", torch.bfloat16, heads, kv_heads, 16, 128) is None


def test_npu_older_scale_keyword(fake_kernels):
    """torch_npu before 7.0 calls the keyword scale_value: the backend retries with it."""
    _, npu = fake_kernels
    inner = fake_npu_fused()

    def old_api(query, key, value, *, scale_value=1.0, **kw):
        if "scale" in kw:
            raise TypeError("unexpected keyword argument 'scale'")
        return inner(query, key, value, scale=scale_value, **kw)

    npu.npu_fused_infer_attention_score = old_api
    nb = attn.BACKENDS["npu"]
    assert attn.self_check(nb, attn.make_npu(), "cpu", torch.bfloat16, 4, 2, 16, 128) is None


def test_runner_falls_back_or_refuses_when_the_kernel_disagrees(fake_kernels, monkeypatch, model_dir):
    """The real ModelRunner: under auto a kernel that fails its start-up check is replaced by sdpa
    (and the engine still loads); named explicitly, it stops the load with the reason."""
    from tritonvl.handlers.engine.model_runner import ModelRunner
    from tritonvl.handlers.modelinfo import load_model_info

    flash, _ = fake_kernels
    flash.flash_attn_varlen_func = fake_flash_varlen(top_left=True)
    fa = attn.BACKENDS["flash_attn"]
    monkeypatch.setitem(attn.BACKENDS, "flash_attn", attn.Backend(**{**fa.__dict__, "device_types": ("cpu",)}))
    info = load_model_info(model_dir)
    runner = ModelRunner(str(model_dir), info, "cpu", torch.bfloat16, 1 << 22, None, "auto")
    assert runner.backend.name == "sdpa" and runner.block_size == 16
    with pytest.raises(ValueError, match="failed its start-up check"):
        ModelRunner(str(model_dir), info, "cpu", torch.bfloat16, 1 << 22, None, "flash_attn")
    flash.flash_attn_varlen_func = fake_flash_varlen()
    runner = ModelRunner(str(model_dir), info, "cpu", torch.bfloat16, 1 << 22, None, "auto")
    assert runner.backend.name == "flash_attn" and runner.block_size == 256


@pytest.mark.parametrize("name", ["flash_attn", "npu"])
def test_engine_through_kernel_contract_equals_generate(fake_kernels, monkeypatch, model_dir, name):
    """The whole engine (scheduler, chunked prefill, paged metadata) driving a kernel backend's
    contract model in float32, every request in flight together, token-identical to generate()."""
    from tests.helpers import assert_offline_equals_generate, make_image

    flash, npu = fake_kernels
    flash.flash_attn_varlen_func = fake_flash_varlen(strict_dtype=False)
    npu.npu_fused_infer_attention_score = fake_npu_fused(strict_dtype=False)
    b = attn.BACKENDS[name]
    monkeypatch.setitem(attn.BACKENDS, name, attn.Backend(**{**b.__dict__, "device_types": ("cpu",), "dtypes": None}))
    specs = [("Tell me a story.", [], 12), ("What is shown?", [make_image(224, 168, 1)], 10),
             ("Compare them.", [make_image(224, 168, 1), make_image(120, 260, 2)], 8)]
    # a 24-token step budget: the image prompts are prefilled in several chunks
    used = assert_offline_equals_generate(model_dir, specs, attention_backend=name, max_num_seqs=4,
                                          max_num_batched_tokens=24)
    assert used == name


def test_select_falls_back_to_sdpa_when_the_kernel_disagrees(fake_kernels, monkeypatch):
    """select() owns the start-up check: auto replaces a disagreeing kernel by sdpa (saying why);
    named explicitly, the same kernel is refused."""
    flash, _ = fake_kernels
    flash.flash_attn_varlen_func = fake_flash_varlen(top_left=True)
    fa = attn.BACKENDS["flash_attn"]
    monkeypatch.setitem(attn.BACKENDS, "flash_attn", attn.Backend(**{**fa.__dict__, "device_types": ("cpu",)}))
    chosen = attn.select("auto", "cpu", torch.bfloat16, 4, 2, 16)
    assert chosen.backend.name == "sdpa" and chosen.fn is attn.sdpa_paged and chosen.block_size == 16
    assert "differs from sdpa" in chosen.why
    with pytest.raises(ValueError, match="failed its start-up check"):
        attn.select("flash_attn", "cpu", torch.bfloat16, 4, 2, 16)


def test_each_attention_function_gets_its_own_name_in_transformers_registry():
    """Two engines in one process (other backends, or a compiled step's wrapper) keep their own functions."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tritonvl.handlers.engine.attention import register

    def one(*a, **k):
        return None

    def other(*a, **k):
        return None

    a, b = register(one), register(other)
    assert a != b and register(one) == a
    assert ALL_ATTENTION_FUNCTIONS[a] is one and ALL_ATTENTION_FUNCTIONS[b] is other
