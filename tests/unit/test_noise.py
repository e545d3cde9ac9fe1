"""handlers/noise.py: torchao's import warnings about extensions it cannot load here (and torch's
pytree deprecation for torchao's Enums) are dropped; other records of those loggers are not. The stubs'
log without them: tests/server/test_stub_log.py."""

from __future__ import annotations

import logging
import sys

from tritonvl.handlers import noise


def test_which_extension_failures_are_noise(monkeypatch):
    other = f"cpython-{sys.version_info.major}{sys.version_info.minor + 1}"
    this = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    so = "Failed to load /x/site-packages/torchao/_C_{}.so: Could not load this library"
    monkeypatch.setattr(noise, "_cuda", lambda: True)  # a CUDA machine: only another Python's build is noise
    assert noise.torchao_extension_noise(so.format(f"mxfp8.{other}-x86_64-linux-gnu"))
    assert not noise.torchao_extension_noise(so.format(f"mxfp8.{this}-x86_64-linux-gnu"))
    assert not noise.torchao_extension_noise(so.format("cutlass_90a.abi3"))
    monkeypatch.setattr(noise, "_cuda", lambda: False)  # no CUDA: its CUDA kernels cannot load
    assert noise.torchao_extension_noise(so.format("cutlass_90a.abi3"))
    assert not noise.torchao_extension_noise("Failed to load /x/elsewhere/libfoo.so: oops")


def test_debug_level_shows_everything():
    noise.quiet_library_noise()
    noise.quiet_library_noise()  # once per process
    logger = logging.getLogger("torch.utils._pytree")
    assert sum(isinstance(f, noise._Drop) for f in logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    message = "<enum 'E'> is an Enum subclass and is now natively supported by torch.compile as an opaque value"
    level, logger.level = logger.level, logging.WARNING
    logger.addHandler(handler)
    try:
        logger.warning(message)
        assert seen == []
        logger.setLevel(logging.DEBUG)
        logger.warning(message)
        assert seen == [message]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
