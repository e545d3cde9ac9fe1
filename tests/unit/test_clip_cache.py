"""preprocess' video cache (handlers/preprocess/clipcache.py): keyed by element and sampling keys,
bounded by bytes, least recently used out first."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tritonvl.handlers.preprocess.clipcache import ClipCache


def clip(n_bytes: int):
    return SimpleNamespace(pixel_values=np.zeros(n_bytes // 4, np.float32))


def test_hit_on_same_element_and_keys_only():
    cache, loads = ClipCache(1 << 20), []

    def load(size=400):
        loads.append(size)
        return clip(size)

    a = cache.get_or_load(b"video-bytes", {"fps": 2}, load)
    assert cache.get_or_load(b"video-bytes", {"fps": 2}, load) is a
    cache.get_or_load(b"video-bytes", {"fps": 1}, load)  # other sampling: another entry
    cache.get_or_load(["f0", "f1"], {"fps": 2}, load)  # a frame list
    cache.get_or_load('["f0", "f1"]', {"fps": 2}, load)  # its JSON text is another element
    assert len(loads) == 4 and (cache.hits, cache.misses) == (1, 4)
    assert cache.snapshot().counters == {"video_cache_hits": 1, "video_cache_misses": 4}


def test_bounded_by_bytes_least_recently_used_out():
    cache = ClipCache(1000)
    cache.get_or_load(b"a", {}, lambda: clip(400))
    cache.get_or_load(b"b", {}, lambda: clip(400))
    cache.get_or_load(b"a", {}, lambda: clip(400))  # a is now the most recent
    cache.get_or_load(b"c", {}, lambda: clip(400))  # b goes
    assert cache.size == 800
    assert cache.get_or_load(b"a", {}, lambda: clip(4)).pixel_values.nbytes == 400
    assert cache.get_or_load(b"b", {}, lambda: clip(4)).pixel_values.nbytes == 4  # reloaded
    big = cache.get_or_load(b"huge", {}, lambda: clip(4000))  # larger than the cache: served, not kept
    assert big.pixel_values.nbytes == 4000 and cache.size <= 1000


def test_off_at_zero():
    cache, loads = ClipCache(0), []
    for _ in range(2):
        cache.get_or_load(b"a", {}, lambda: loads.append(1) or clip(4))
    assert len(loads) == 2
