"""The vision encoder's embedding cache: repeated images skip the tower, the cache stays within its
byte bound, and the least recently used image goes first."""

from __future__ import annotations

import numpy as np

from tritonvl.handlers.lru import BytesLRU
from tritonvl.handlers.vision.encoder import VisionEncoder

MERGE, HIDDEN, PATCH = 4, 8, 6


class CountingTower:
    """A stand-in tower: each output token is a function of its image's patches (so a wrong split or
    a stale cache entry shows), and every call is recorded."""

    merge_unit, hidden, patch_dim = MERGE, HIDDEN, PATCH

    def __init__(self) -> None:
        self.calls: list[int] = []  # images per call

    def __call__(self, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
        self.calls.append(len(grid))
        tokens = pixels.reshape(-1, MERGE * PATCH).sum(axis=1, keepdims=True)
        return (tokens * np.arange(1, HIDDEN + 1, dtype=np.float32)).astype(np.float32)


def image(seed: int, h: int = 2, w: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(pixel patches, grid row) of one image of h*w patches (h*w/MERGE tokens)."""
    return np.random.default_rng(seed).random((h * w, PATCH), dtype=np.float32), np.array([[1, h, w]])


def request(*images) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p for p, _ in images]), np.concatenate([g for _, g in images])


def token_bytes(h: int = 2, w: int = 4) -> int:
    return h * w // MERGE * HIDDEN * 4


def test_repeated_image_is_a_hit_and_skips_the_tower():
    tower = CountingTower()
    enc = VisionEncoder(tower, cache_bytes=1 << 20)
    a, b = image(1), image(2)
    first = enc.encode([request(a, b)])[0]
    assert tower.calls == [2] and (enc.cache.hits, enc.cache.misses) == (0, 2)
    # same images again (other order, other request, in one batch with a new image)
    again, new = enc.encode([request(b, a), request(image(3))])
    assert tower.calls == [2, 1]  # only the new image ran
    assert (enc.cache.hits, enc.cache.misses) == (2, 3)
    n = first.embeds.shape[0] // 2
    assert np.array_equal(again.embeds[:n], first.embeds[n:]) and np.array_equal(again.embeds[n:], first.embeds[:n])
    assert again.hashes == first.hashes[::-1] and new.hashes[0] not in first.hashes
    assert enc.snapshot().counters == {"image_cache_hits": 2, "image_cache_misses": 3}


def test_cache_stays_within_its_byte_bound_and_evicts_least_recently_used():
    tower = CountingTower()
    enc = VisionEncoder(tower, cache_bytes=3 * token_bytes())  # room for three images
    imgs = [image(10 + i) for i in range(4)]
    for img in imgs[:3]:
        enc.encode([request(img)])
    enc.encode([request(imgs[0])])  # touch image 0: image 1 is now the oldest
    assert tower.calls == [1, 1, 1]
    enc.encode([request(imgs[3])])  # evicts image 1
    assert enc.cache.bytes <= enc.cache.max_bytes and len(enc.cache._items) == 3
    calls = len(tower.calls)
    enc.encode([request(imgs[0]), request(imgs[2]), request(imgs[3])])
    assert len(tower.calls) == calls  # all three still cached
    enc.encode([request(imgs[1])])
    assert len(tower.calls) == calls + 1  # image 1 was evicted


def test_an_item_over_the_bound_is_not_cached_and_zero_turns_the_cache_off():
    cache = BytesLRU(100)
    cache.put(b"big", "x", 101)
    assert cache.get(b"big") is None and cache.bytes == 0
    tower = CountingTower()
    enc = VisionEncoder(tower, cache_bytes=0)
    for _ in range(2):
        enc.encode([request(image(5))])
    assert tower.calls == [1, 1] and enc.cache.bytes == 0


def test_real_tower_cached_embeddings_equal_fresh_ones(model_dir):
    """With the tiny model's tower: an image served from the cache equals the same image encoded
    alone, and encoding it beside others does not change it."""
    import torch
    from helpers import make_image

    from tritonvl.handlers.preprocess.preprocessor import Preprocessor, RawRequest
    from tritonvl.handlers.vision.encoder import load_tower

    pre = Preprocessor(str(model_dir))
    m = pre.process(RawRequest(text_input=b"Hi", images=[make_image(84, 56, seed=1)]))
    other = pre.process(RawRequest(text_input=b"Hi", images=[make_image(112, 84, seed=2)]))
    tower = load_tower(str(model_dir), "cpu", torch.float32)
    fresh = VisionEncoder(tower, cache_bytes=0).encode([(m.pixel_values, m.image_grid_thw)])[0].embeds
    enc = VisionEncoder(tower)
    enc.encode([(other.pixel_values, other.image_grid_thw), (m.pixel_values, m.image_grid_thw)])
    cached = enc.encode([(m.pixel_values, m.image_grid_thw)])[0].embeds
    assert enc.cache.hits == 1
    # the cached rows were computed in a batch of two images: fp32 GEMMs over other row counts sum in another
    # order (seen on AMD EPYC: 1.7e-5 on values up to ~30), so equal within fp32 rounding, not bitwise
    np.testing.assert_allclose(cached, fresh, rtol=1e-4, atol=1e-4 * float(np.abs(fresh).max()))


def test_a_bad_request_fails_alone_and_the_batch_carries_on():
    """Per-request errors in a dynamic batch (docs/INTERFACE.md): malformed inputs are refused before
    the one forward; a forward that fails anyway is retried one request at a time."""
    from tritonvl.client.rules.errors import InvalidArgument

    tower = CountingTower()
    enc = VisionEncoder(tower, cache_bytes=0)
    a, b = image(1), image(2)
    alone = [enc.encode([request(x)])[0].embeds for x in (a, b)]
    pixels, grid = request(a)
    bad = [(pixels[:-1], grid), (pixels[:, :2], grid), (pixels, np.array([[1, 3, 4]])), (None, None),
           (pixels, np.array([[1, 2]]))]
    for case in bad:
        out = enc.encode([request(a), case, request(b)])
        assert isinstance(out[1], InvalidArgument), case
        np.testing.assert_array_equal(out[0].embeds, alone[0])
        np.testing.assert_array_equal(out[2].embeds, alone[1])

    class Fussy(CountingTower):
        def __call__(self, pixels, grid):
            if (pixels == 7).any():
                raise RuntimeError("the tower chokes")
            return super().__call__(pixels, grid)

    enc = VisionEncoder(Fussy(), cache_bytes=0)
    poison = (np.full_like(pixels, 7), grid)
    out = enc.encode([request(a), poison, request(b)])
    assert isinstance(out[1], RuntimeError)
    np.testing.assert_array_equal(out[0].embeds, alone[0])
    np.testing.assert_array_equal(out[2].embeds, alone[1])
