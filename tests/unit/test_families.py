"""The model family from config.json, and where a prompt's images and videos sit (engine/visual.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.engine.visual import grid_kinds, mm_token_types
from tritonvl.handlers.modelinfo import load_model_info

TEXT_CFG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 151936}


def write(tmp_path, model_type, **extra):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "text_config": TEXT_CFG, **extra}))
    return tmp_path


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_family_from_model_type(tmp_path, family):
    info = load_model_info(write(tmp_path, family))
    assert info.family == family and info.timestamps_videos == family.startswith("qwen3")


def test_unknown_family_refused(tmp_path):
    with pytest.raises(ValueError, match="'llava'.*supported: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe"):
        load_model_info(write(tmp_path, "llava"))


def test_deepstack_width(tmp_path):
    info = load_model_info(write(tmp_path, "qwen3_vl", vision_config={"deepstack_visual_indexes": [1, 2, 3]}))
    assert info.deepstack_layers == 3 and info.embed_width == 4 * 64


@pytest.fixture
def info(tmp_path):
    return load_model_info(write(tmp_path, "qwen2_5_vl"))


def test_grid_kinds_follow_the_placeholders(info):
    img, vid = info.image_token_id, info.video_token_id
    # a video of 2x2x4 patches (4 tokens), then an image of 1x2x2 (1 token)
    ids = np.array([1, 2, vid, vid, vid, vid, 3, img, 4])
    types = mm_token_types(ids, info)
    assert types.tolist() == [0, 0, 2, 2, 2, 2, 0, 1, 0]
    assert grid_kinds(types, np.array([[2, 2, 4], [1, 2, 2]]), 4).tolist() == [2, 1]


def test_grid_kinds_refuse_mismatches(info):
    img, vid = info.image_token_id, info.video_token_id
    types = mm_token_types(np.array([img, img, vid, vid]), info)
    with pytest.raises(InvalidArgument, match="mix image and video"):
        grid_kinds(types, np.array([[1, 2, 6], [1, 2, 2]]), 4)
    with pytest.raises(InvalidArgument, match="4 image/video placeholder tokens for 1 images and videos of 1"):
        grid_kinds(types, np.array([[1, 2, 2]]), 4)
