"""The parameter table (handlers/params.py) and the repository copy with overrides (tools/repository.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tritonvl.handlers import params as P
from tritonvl.handlers.tools.repository import config_parameters, edit_config, parse_sets, repository_with

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository"


def test_docs_parameters_md_is_generated_from_the_table():
    committed = (ROOT / "docs" / "PARAMETERS.md").read_text()
    assert committed == P.markdown(), (
        "stale: python -m tritonvl.handlers.params --markdown > docs/PARAMETERS.md"
    )


@pytest.mark.parametrize("model", list(P.MODELS))
def test_shipped_configs_declare_only_known_keys_with_the_table_defaults(model):
    raw = config_parameters((REPO / model / "config.pbtxt").read_text())
    assert raw, model
    assert P.read(model, raw) == P.read(model, {})  # the code's defaults are the shipped ones


def test_defaults_and_types():
    llm = P.read("llm", {})
    assert llm.backend == "engine" and llm.max_num_seqs == 64 and llm.enable_prefix_caching is True
    assert llm.kv_cache_bytes is None and llm.block_size is None and llm.max_model_len is None
    assert llm.kv_cache_fraction == 0.5 and llm.request_deadline_s == 600.0 and llm.npu_device_ids == ()
    pre = P.read(
        "preprocess", {"image_formats": "png, jpeg", "image_url_allowlist": "a.example, *.b.example"}
    )
    assert pre.image_formats == ("PNG", "JPEG") and pre.image_url_allowlist == ("a.example", "*.b.example")
    vis = P.read("vision_encoder", {"npu_device_ids": "0,1, 3", "dtype": "BF16", "device": "CUDA"})
    assert vis.npu_device_ids == (0, 1, 3) and vis.dtype == "bf16" and vis.device == "cuda"


@pytest.mark.parametrize(
    "text,value",
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("Yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
    ],
)
def test_booleans(text, value):
    assert P.read("llm", {"enable_prefix_caching": text}).enable_prefix_caching is value
    assert P.read("preprocess", {"exit_on_stub_failure": text}).exit_on_stub_failure is value


@pytest.mark.parametrize("model", ["llm", "vision_encoder"])
def test_num_threads_means_the_same_in_every_model(model):
    half = max(1, int((os.cpu_count() or 1) * 0.5))
    assert P.read(model, {"num_threads": "auto"}).num_threads == half
    assert P.read(model, {"num_threads": "3"}).num_threads == 3
    assert P.read(model, {"num_threads": "0"}).num_threads == 0
    with pytest.raises(P.ParamError, match=f"{model}: parameter 'num_threads' = 'many': expected .*auto"):
        P.read(model, {"num_threads": "many"})


def test_empty_and_placeholders_mean_unset():
    assert P.read("llm", {"max_num_seqs": "${MAX_SEQS}", "max_model_len": "", "backend": " "}) == P.read(
        "llm", {}
    )


def test_unknown_key_names_model_key_and_nearest():
    with pytest.raises(P.ParamError) as e:
        P.read("llm", {"max_num_seqz": "3"})
    msg = str(e.value)
    assert msg.startswith("llm: unknown parameter 'max_num_seqz'") and "did you mean 'max_num_seqs'" in msg
    with pytest.raises(P.ParamError, match="unknown model 'lm'"):
        P.read("lm", {})
    with pytest.raises(P.ParamError, match="vision_encoder: unknown parameter 'max_num_seqs'"):
        P.read("vision_encoder", {"max_num_seqs": "3"})  # an llm key is not a vision_encoder key


@pytest.mark.parametrize(
    "model,key,value,rule",
    [
        ("llm", "max_num_seqs", "sixty", "an integer >= 1"),
        ("llm", "max_num_seqs", "0", "an integer >= 1"),
        ("llm", "max_num_seqs", "2.5", "an integer >= 1"),
        ("llm", "kv_cache_fraction", "0", "a number > 0 and <= 1"),
        ("llm", "kv_cache_fraction", "1.5", "a number > 0 and <= 1"),
        ("llm", "request_deadline_s", "nan", "a number >= 0"),
        ("llm", "enable_prefix_caching", "on", "true/false"),
        ("llm", "backend", "vllm", "one of engine, generate"),
        ("llm", "attention_backend", "xformers", "one of auto, sdpa, flash_attn, triton, npu"),
        ("preprocess", "image_formats", "PNG,TIFF", "each one of JPEG, PNG, WEBP, GIF, BMP"),
        ("vision_encoder", "npu_device_ids", "0,x", "each an integer >= 0"),
    ],
)
def test_bad_values_name_model_key_value_and_rule(model, key, value, rule):
    with pytest.raises(P.ParamError) as e:
        P.read(model, {key: value})
    assert str(e.value).startswith(f"{model}: parameter {key!r} = {value!r}: expected ") and rule in str(
        e.value
    )


def test_set_strings_are_checked():
    assert parse_sets(
        ["llm.max_num_seqs=3", "llm.instance_kind=KIND_GPU", "vision_encoder.instance_count=2"]
    ) == {
        "llm": {"max_num_seqs": "3", "instance_kind": "KIND_GPU"},
        "vision_encoder": {"instance_count": "2"},
    }
    for item, words in [
        ("llm.max_num_seqz=3", "max_num_seqz"),
        ("llm.instance_count=0", "instance_count"),
        ("qwen2_5_vl_ensemble.x=1", "unknown model 'qwen2_5_vl_ensemble'"),
        ("llm=3", "MODEL.KEY=VALUE"),
        ("llm.instance_kind=KIND_TPU", "KIND_CPU, KIND_GPU"),
    ]:
        with pytest.raises(P.ParamError, match=words):
            parse_sets([item])


def test_edit_config_replaces_adds_and_rewrites_instance_groups():
    text = (REPO / "llm" / "config.pbtxt").read_text()
    out = edit_config(
        text,
        {
            "max_num_seqs": "3",
            "block_size": "32",
            "model_path": '/m/"q"',
            "instance_kind": "KIND_GPU",
            "instance_count": "2",
            "max_queue_delay_microseconds": "100",
            "preferred_batch_size": "2,4",
        },
    )
    raw = config_parameters(out)
    assert raw["max_num_seqs"] == "3" and raw["block_size"] == "32" and raw["model_path"] == '/m/"q"'
    assert "instance_group [ { count: 2, kind: KIND_GPU } ]" in out
    assert "dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [ 2, 4 ] }" in out
    added = edit_config(
        out.replace('parameters: { key: "max_waiting" value: { string_value: "1024" } }\n', ""),
        {"max_waiting": "7"},
    )
    assert config_parameters(added)["max_waiting"] == "7"  # absent from the config: added
    bare = edit_config('name: "m"\n', {"instance_count": "3", "max_queue_delay_microseconds": "0"})
    assert (
        "instance_group [ { count: 3 } ]" in bare
        and "dynamic_batching { max_queue_delay_microseconds: 0 }" in bare
    )
    gpus = edit_config("instance_group [ { kind: KIND_GPU, gpus: [ 0, 1 ] } ]\n", {"instance_count": "2"})
    assert gpus == "instance_group [ { kind: KIND_GPU, gpus: [ 0, 1 ], count: 2 } ]\n"


def test_repository_with_writes_a_checked_copy(tmp_path):
    dest = repository_with(tmp_path / "repo", {"llm": {"max_num_seqs": "3", "instance_count": "2"}})
    raw = config_parameters((dest / "llm" / "config.pbtxt").read_text())
    assert P.read("llm", raw).max_num_seqs == 3
    assert (dest / "qwen2_5_vl" / "config.pbtxt").is_file() and (dest / "llm" / "1" / "model.py").is_file()
    assert config_parameters((REPO / "llm" / "config.pbtxt").read_text())["max_num_seqs"] == "64"  # untouched
    with pytest.raises(P.ParamError, match="max_num_seqz"):
        repository_with(tmp_path / "bad", {"llm": {"max_num_seqz": "3"}})
    assert not (tmp_path / "bad").exists()  # refused before copying
    # a misspelt key already in the repository is refused too, naming it
    cfg = dest / "preprocess" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + 'parameters: { key: "max_image_byte" value: { string_value: "9" } }\n')
    with pytest.raises(
        P.ParamError, match="preprocess: unknown parameter 'max_image_byte'.*'max_image_bytes'"
    ):
        repository_with(tmp_path / "again", {}, repo=dest)


def test_attention_backend_choices_are_the_engines_registry():
    from dataclasses import fields

    from tritonvl.handlers.engine.attention import BACKENDS

    rule = next(f.metadata["rule"] for f in fields(P.LLMParams) if f.name == "attention_backend")
    assert set(rule.choices) == {"auto", *BACKENDS}


def test_llm_max_model_len_is_preprocess_too(tmp_path):
    """One max_model_len: --set llm.max_model_len reaches preprocess (unless it is given its own)."""
    from tritonvl.handlers.tools.repository import config_parameters, repository_with

    repo = repository_with(tmp_path / "a", {"llm": {"max_model_len": "512"}})
    for model in ("llm", "preprocess"):
        assert config_parameters((repo / model / "config.pbtxt").read_text())["max_model_len"] == "512"
    repo = repository_with(tmp_path / "b", {"llm": {"max_model_len": "512"}, "preprocess": {"max_model_len": "256"}})
    assert config_parameters((repo / "preprocess" / "config.pbtxt").read_text())["max_model_len"] == "256"
