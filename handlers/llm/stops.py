"""Explicit stops: the public front asks `llm` to end a request by its key (TensorRT-LLM's pattern).

On Triton 24.10 a BLS caller cannot cancel the decoupled request it made (response iterators have
no ``cancel()`` before python_backend r25.04), so the front sends `llm` a second request carrying
``stop`` and the key of the first. Each job watches its key from when it arrived (``watch``): a stop
counts for it when it came at most ``grace_seconds`` before the job (the front's stop can overtake
its request) or any time after. A stop for a key that a later request reuses does not reach that
request once the grace has passed, and the keys kept are bounded (oldest dropped) so a flood of
stops cannot grow the stub. The front's keys are random (uuid4): other clients cannot guess them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class StopRegistry:
    def __init__(self, keep_seconds: float = 120.0, grace_seconds: float = 5.0, max_keys: int = 65536) -> None:
        self.keep, self.grace, self.max_keys = keep_seconds, grace_seconds, max_keys
        self._keys: OrderedDict[str, float] = OrderedDict()  # key -> when its last stop came, oldest first
        self._lock = threading.Lock()

    def stop(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._keys.pop(key, None)
            self._keys[key] = now
            while self._keys and (len(self._keys) > self.max_keys or now - next(iter(self._keys.values())) > self.keep):
                self._keys.popitem(last=False)

    def watch(self, key: str) -> Callable[[], bool]:
        """Whether the job with ``key`` arriving now has been stopped (checked every engine step)."""
        since = time.monotonic() - self.grace

        def stopped() -> bool:
            when = self._keys.get(key)
            return bool(key) and when is not None and when >= since

        return stopped
