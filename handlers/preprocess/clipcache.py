"""Decoded videos kept by content: a video sent again (each turn of a chat about one clip resends
it) skips demuxing, decoding, resizing and patchifying.

Keyed by a hash of the element as sent (container bytes, base64, data URI or frame list) and the
sampling keys that shaped it; bounded by the bytes of the rows it holds, least recently used out
first (handlers/lru.py). One per preprocess instance, called from its execute() thread; ``max_bytes`` 0
turns it off.
"""

from __future__ import annotations

import hashlib
import json

from tritonvl.handlers.lru import BytesLRU


class ClipCache:
    def __init__(self, max_bytes: int) -> None:
        self.lru = BytesLRU(max_bytes)

    hits = property(lambda self: self.lru.hits)
    misses = property(lambda self: self.lru.misses)
    size = property(lambda self: self.lru.bytes)  # bytes held

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

        return Snapshot(counters={"video_cache_hits": self.lru.hits, "video_cache_misses": self.lru.misses})

    def get_or_load(self, item, options: dict, load):
        """The cached rows of (item, options), else ``load()``'s, kept when they fit."""
        if self.lru.max_bytes <= 0:
            return load()
        key = self.key(item, options)
        clip = self.lru.get(key)
        if clip is None:
            clip = load()
            self.lru.put(key, clip, clip.pixel_values.nbytes)
        return clip
