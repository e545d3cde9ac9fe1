"""Qwen2-VL (no window attention in the tower) served through the same repository: parity with generate()."""

from family_cases import *  # noqa: F403 -- the shared cases, run against this module's server

FAMILY = "qwen2_vl"
