"""scripts/gpu_check.py on CPU: the in-process pipeline equals generate() in float32, and the
decode-speed report has sane figures. (On a GPU the same script gives the CUDA numbers.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_on_cpu(model_dir, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu",
                           "--model", str(model_dir), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["equal"] for r in report["parity_fp32"]] == [True] * 3
    assert {r["images"] for r in report["parity_fp32"]} == {0, 1, 2}
    for row in report["decode"]:
        assert 0 < row["itl_ms"] < 10_000 and row["bound_tokens_per_s"] > 0
    assert "fp32 parity: PASS" in proc.stdout


def test_published_checkpoint_layout_equals_generate(model_dir, tmp_path):
    """A checkpoint in the published (transformers 4.x) layout, as downloaded from the hub: same sizes
    and ids read, and the engine's output equals generate() on the original model."""
    from tests.helpers import assert_offline_equals_generate, make_image, to_published_layout
    from tritonvl.handlers.modelinfo import load_model_info

    legacy = tmp_path / "published"
    to_published_layout(model_dir, legacy)
    assert "text_config" not in json.loads((legacy / "config.json").read_text())
    new, old = load_model_info(model_dir), load_model_info(legacy)
    assert {**vars(new), "path": ""} == {**vars(old), "path": ""}
    specs = [("Say something.", [], 10), ("What is shown?", [make_image(200, 150, 4)], 10)]
    assert_offline_equals_generate(legacy, specs, ref_dir=model_dir)


def test_other_shapes_untied_padded_vocab_mha(tmp_path):
    """A 7B-like shape at toy size: untied lm_head, vocabulary padded past the tokenizer (152064),
    plain multi-head attention, head_dim 32; engine output equals generate() (ids the tokenizer does
    not know decode to nothing, they do not break the stream)."""
    from tests.helpers import assert_offline_equals_generate, make_image
    from tritonvl.handlers.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "m", {
        "text": {"hidden_size": 128, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "mrope_section": [4, 6, 6], "vocab_size": 152064},
        "tie_word_embeddings": False, "seed": 11})
    specs = [("Hello there.", [], 12), ("Look.", [make_image(150, 210, 9)], 12)]
    assert_offline_equals_generate(model, specs)


def test_the_engine_thread_does_all_the_torch_work(model_dir, monkeypatch):
    """The model load, the vision tower's load and encoding, and every step run on the engine thread,
    none on the caller's (LLMEngine.__init__: a second thread with parallel torch work leaves an idle
    OpenMP team behind, and libgomp then stops spinning between parallel regions; on 2 cores the
    bench preset's batch-1 decode step went 27 -> 19 ms when the load moved onto the engine thread)."""
    import threading

    from tests.helpers import make_image
    from tritonvl.handlers.engine import model_runner
    from tritonvl.handlers.preprocess.preprocessor import RawRequest
    from tritonvl.handlers.tools import offline
    from tritonvl.handlers.vision import encoder

    seen: dict[str, set] = {}

    def on(owner, name, key):
        real = getattr(owner, name)

        def wrapped(*a, **k):
            seen.setdefault(key, set()).add(threading.current_thread().name)
            return real(*a, **k)

        monkeypatch.setattr(owner, name, wrapped)

    on(model_runner.ModelRunner, "__init__", "model load")
    on(model_runner.ModelRunner, "run", "steps")
    on(offline, "load_tower", "tower load")
    on(encoder.VisionEncoder, "encode", "encode")
    with offline.OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24) as pipe:
        res = pipe.generate([RawRequest(text_input=b"What is shown?", images=[make_image(120, 90, seed=3)],
                                        sampling={"max_tokens": 4, "temperature": 0.0})])
    assert res[0].token_ids and not res[0].error
    assert seen == {k: {"tritonvl-engine"} for k in ("model load", "steps", "tower load", "encode")}, seen


def test_a_load_error_on_the_engine_thread_reaches_the_caller(model_dir):
    """The model loads on the engine thread: its error is raised in the caller (as before, when the
    caller loaded), and the thread is gone."""
    import threading

    import pytest

    from tritonvl.handlers.tools.offline import OfflinePipeline

    def engines() -> set:
        return {t for t in threading.enumerate() if t.name == "tritonvl-engine" and t.is_alive()}

    before = engines()  # other modules' engines, if any still run
    with pytest.raises(ValueError, match="flash_attn"):
        OfflinePipeline(str(model_dir), kv_cache_bytes=1 << 24, attention_backend="flash_attn")
    assert engines() <= before
