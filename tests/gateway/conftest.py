"""Gateway tests: each module starts its own gateway (and stops it) in front of a tritonserver of its
own or a session one (tests/conftest.py: ``server``, ``video_server``)."""

from __future__ import annotations

import re

import pytest
import requests
from helpers import Reference


@pytest.fixture(scope="module")
def ref(reference):
    return reference  # the session's generate() on the test model (tests/conftest.py)


def text_of(ref: Reference, ids: list[int]) -> str:
    """What the server shows for these generated ids (special tokens skipped, as by default)."""
    return ref.tok.decode(ids, skip_special_tokens=True)


def gateway_metrics(url: str) -> dict[str, float]:
    """tritonvl_gateway_* samples, keyed by name plus labels as written."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(tritonvl_gateway_\S+) (\S+)$", text, re.M)}
