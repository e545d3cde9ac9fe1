"""Known noise of libraries a stub imports, kept out of tritonserver's log, and nothing else.

transformers imports torchao (when it is installed) on its first model load. torchao's import then
logs a warning for each of its compiled extensions it cannot load (a wheel's ``_C_mxfp8`` built for
another Python; ``_C_cutlass_90a``, CUDA kernels, on a machine without CUDA), and torch logs a
deprecation for each Enum torchao registers with pytree. None of it changes what tritonvl runs.
:func:`quiet_library_noise` drops exactly those records; a record of the same loggers that is not one
of them passes, and so does everything while the logger is set to DEBUG.
"""

from __future__ import annotations

import logging
import re
import sys

_SO = re.compile(r"^Failed to load (\S*/torchao/_C[^/\s]*\.so)\b")
_PYTREE = "is an Enum subclass and is now natively supported by torch.compile"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no torch, no CUDA
        return False


def torchao_extension_noise(message: str) -> bool:
    """A torchao extension that cannot be meant for this process: built for another Python, or (the
    CUDA kernels) with no CUDA device here. On a CUDA machine, a failure to load one is a real problem."""
    m = _SO.match(message)
    if m is None:
        return False
    tag = re.search(r"\.cpython-(\d+)-", m[1])
    return (tag is not None and tag[1] != f"{sys.version_info.major}{sys.version_info.minor}") or not _cuda()


class _Drop(logging.Filter):
    def __init__(self, logger: logging.Logger, noise) -> None:
        super().__init__()
        self.logger, self.noise = logger, noise

    def filter(self, record: logging.LogRecord) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG) or not self.noise(record.getMessage())


def quiet_library_noise() -> None:
    """Install the filters (once per process; before torchao is imported, which is at the first
    model load: handlers/tritonserver/adapter.py calls this from every model's initialize())."""
    for name, noise in (("torchao", torchao_extension_noise),
                        ("torch.utils._pytree", lambda message: _PYTREE in message)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(logger, noise))
