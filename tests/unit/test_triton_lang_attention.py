"""The ``triton`` attention backend (our OpenAI-Triton paged decode kernel) run by Triton's CPU
interpreter (TRITON_INTERPRET=1): the kernel against sdpa on random mixed steps, and the whole engine
through it equal to generate(). The interpreter runs the same kernel source a GPU compiles; on a GPU
the engine's start-up self-check repeats the comparison on the real device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import torch
from tritonvl.handlers.engine import attention as attn
b = attn.BACKENDS["triton"]
attn.BACKENDS["triton"] = attn.Backend(**{**b.__dict__, "device_types": ("cpu",)})
"""


def run_interpreted(body: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_kernel_matches_sdpa_on_mixed_steps():
    out = run_interpreted("""
        fn = attn.make_triton()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for heads, kvh, dim, bs in ((4, 4, 16, 16), (6, 2, 16, 16), (8, 2, 24, 32), (14, 2, 64, 16)):
                for seed in (0, 1):
                    problem = attn.self_check(attn.BACKENDS["triton"], fn, "cpu", dtype, heads, kvh, dim, bs, seed)
                    assert problem is None, (dtype, heads, kvh, dim, bs, problem)
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_auto_prefers_triton_when_it_can_run_and_checks_block_size():
    out = run_interpreted("""
        assert attn.select("auto", "cpu", torch.float32, 4, 4, 64).backend.name == "triton"
        assert attn.select("auto", "cpu", torch.float32, 4, 4, 64, block_size=48).backend.name == "sdpa"
        try:
            attn.select("triton", "cpu", torch.float32, 4, 4, 64, block_size=48)
        except ValueError as e:
            assert "power of two" in str(e)
        else:
            raise AssertionError("block_size 48 accepted")
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_engine_through_triton_kernel_equals_generate(model_dir):
    out = run_interpreted(f"""
        from tests.helpers import assert_offline_equals_generate, make_image
        specs = [("Tell me a story.", [], 10), ("What is shown?", [make_image(224, 168, 1)], 8),
                 ("Compare them.", [make_image(224, 168, 1), make_image(120, 260, 2)], 6)]
        used = assert_offline_equals_generate({str(model_dir)!r}, specs, attention_backend="triton", max_num_seqs=4,
                                              max_num_batched_tokens=24)
        assert used == "triton", used
        print("OK")
    """)
    assert out.strip().endswith("OK")
