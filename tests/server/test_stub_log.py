"""The session server's log (every stub's stderr) holds none of the library noise handlers/noise.py
drops: transformers imports torchao in each stub that loads a model, and on this machine torchao's
import warns about its CUDA / other-Python extensions (tests/unit/test_noise.py for the rules)."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import infer_http


def test_no_torchao_import_noise_in_the_stub_log(server):
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed: its import warnings cannot occur")
    assert infer_http(server.http_url, text_input="Hi", max_tokens=2)["output_ids"]  # every stub loaded and served
    log = server.log_tail(10_000_000)
    assert "successfully loaded 'llm'" in log, log[-3000:]
    assert "/torchao/_C" not in log, [line for line in log.splitlines() if "/torchao/_C" in line][:4]
    assert "is an Enum subclass and is now natively supported" not in log
