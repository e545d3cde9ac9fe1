"""Qwen3-VL (deepstack features added to the first decoder layers' image rows): parity with generate()."""

from family_cases import *  # noqa: F403 -- the shared cases, run against this module's server

FAMILY = "qwen3_vl"
