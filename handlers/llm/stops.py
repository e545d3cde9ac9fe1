"""Explicit stops: the public front asks `llm` to end a request by its key (TensorRT-LLM's pattern).

On Triton 24.10 a BLS caller cannot cancel the decoupled request it made (response iterators have
no ``cancel()`` before python_backend r25.04), so the front sends `llm` a second request carrying
``stop`` and the key of the first. The key is looked up by the job's ``is_cancelled`` every engine
step; a stop that arrives before its job (or after it ended) is kept a while, then forgotten.
"""

from __future__ import annotations

import threading
import time


class StopRegistry:
    def __init__(self, keep_seconds: float = 120.0) -> None:
        self.keep = keep_seconds
        self._keys: dict[str, float] = {}
        self._lock = threading.Lock()

    def stop(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._keys = {k: t for k, t in self._keys.items() if now - t < self.keep}
            self._keys[key] = now

    def stopped(self, key: str) -> bool:
        return bool(key) and key in self._keys
