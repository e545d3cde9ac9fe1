"""Decoded videos kept by content: a video sent again (each turn of a chat about one clip resends
it) skips demuxing, decoding, resizing and patchifying.

Keyed by a hash of the element as sent (container bytes, base64, data URI or frame list) and the
sampling keys that shaped it; bounded by the bytes of the rows it holds, least recently used out
first. One per preprocess instance; ``max_bytes`` 0 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict


class ClipCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(item, options: dict) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(options, sort_keys=True).encode())
        if isinstance(item, list):
            h.update(b"list:" + json.dumps(item).encode())
        else:
            h.update(item.encode("utf-8", "surrogatepass") if isinstance(item, str) else bytes(item))
        return h.digest()

    def snapshot(self):
        from tritonvl.handlers.metrics import Snapshot

        return Snapshot(counters={"video_cache_hits": self.hits, "video_cache_misses": self.misses})

    def get_or_load(self, item, options: dict, load):
        """The cached rows of (item, options), else ``load()``'s, kept when they fit."""
        if self.max_bytes <= 0:
            return load()
        key = self.key(item, options)
        with self._lock:
            clip = self._items.get(key)
            if clip is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return clip
            self.misses += 1
        clip = load()
        size = clip.pixel_values.nbytes
        if size <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = clip
                    self.size += size
                while self.size > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.size -= old.pixel_values.nbytes
        return clip
