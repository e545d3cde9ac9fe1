"""A least-recently-used map bounded by the bytes of what it holds (the encoder's embedding cache,
preprocess' decoded-video cache). Not thread-safe: each user calls it from one thread."""

from __future__ import annotations

from collections import OrderedDict


class BytesLRU:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, tuple[object, int]] = OrderedDict()

    def get(self, key: bytes):
        """The value under ``key`` (now the most recent), else None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: bytes, value, nbytes: int) -> None:
        """Keep ``value`` unless it alone is over the bound; the least recent ones go to make room."""
        if nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size
