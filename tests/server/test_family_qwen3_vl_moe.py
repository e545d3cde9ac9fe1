"""Qwen3-VL MoE (sparse expert MLPs in every decoder layer, run by transformers' own expert layers;
deepstack and timestamped videos as Qwen3-VL): parity with generate()."""

from family_cases import *  # noqa: F403 -- the shared cases, run against this module's server

FAMILY = "qwen3_vl_moe"
