"""Shared fixtures: a tiny model of its own sizes and ONE real tritonserver per test session (and one
more with small video limits, started by the first module that asks for it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.register_assert_rewrite("family_cases")  # its parity checks run in other modules: readable failures

# Sizes deliberately different from the embedded default (catches hard-coded sizes).
TEST_MODEL_SIZES = {
    "text": {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 6,
             "num_key_value_heads": 2, "mrope_section": [2, 3, 3]},
    "vision": {"depth": 3, "hidden_size": 48, "intermediate_size": 80, "num_heads": 3,
               "fullatt_block_indexes": [2]},
    "tie_word_embeddings": True,
    "seed": 7,
    "max_pixels": 100 * 28 * 28,
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from tritonvl.handlers.tiny_model import build_tiny_model

    cached = os.environ.get("TRITONVL_TEST_MODEL")
    if cached and (Path(cached) / "model.safetensors").is_file():
        return Path(cached)
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-test", TEST_MODEL_SIZES)


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """A real tritonserver on model_repository/ serving the test model."""
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")
    from helpers import running_server

    with running_server(model_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="session")
def reference(model_dir):
    """transformers' generate() on the test model (helpers.Reference), loaded once for the session;
    its answers are kept, so modules asking the same question pay once. Read it, never change its model."""
    from helpers import Reference

    return Reference(str(model_dir))


# preprocess settings of ``video_server``: video sizes and limits small enough for fast tests
VIDEO_SETTINGS = {"video_min_pixels": 4 * 28 * 28, "video_max_pixels": 24 * 28 * 28,
                  "video_total_pixels": 96 * 28 * 28, "max_video_seconds": 30, "max_video_frames": 300,
                  "max_video_bytes": 2_000_000}


@pytest.fixture(scope="session")
def video_server(model_dir, tmp_path_factory):
    """A real tritonserver serving the test model with VIDEO_SETTINGS, shared by the video modules of
    tests/client and tests/gateway (one start instead of one per module)."""
    if shutil.which("tritonserver") is None:
        pytest.importorskip("pytriton", reason="no tritonserver: run scripts/setup.sh")
    from helpers import running_server

    with running_server(model_dir, tmp_path_factory.mktemp("video_server"),
                        overrides={"preprocess": VIDEO_SETTINGS}) as srv:
        yield srv
