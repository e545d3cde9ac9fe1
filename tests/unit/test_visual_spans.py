"""Prefix-cache keys of image and video placeholder runs (handlers/engine/visual.py image_spans)."""

from __future__ import annotations

import numpy as np
import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.engine.visual import image_spans

IMG, VID, T = 5, 6, 1  # placeholder ids and a text token


def ids(*runs):
    out = []
    for tok, n in runs:
        out += [tok] * n
    return np.array(out)


def test_one_run_per_item_keeps_its_hash():
    prompt = ids((T, 2), (IMG, 4), (T, 1), (VID, 8), (T, 3))
    spans = image_spans(prompt, (IMG, VID), [b"a", b"b"], np.array([[1, 4, 4], [2, 4, 4]]), 4)
    assert spans == [(2, 4, b"a"), (7, 8, b"b")]


def test_a_video_split_by_timestamps_gets_a_key_per_run():
    # Qwen3-VL: <t seconds> text between a video's temporal patches: 3 runs of 4 for one [3, 4, 4] item
    prompt = ids((T, 1), (VID, 4), (T, 2), (VID, 4), (T, 2), (VID, 4), (T, 1), (IMG, 4))
    spans = image_spans(prompt, (IMG, VID), [b"v", b"i"], np.array([[3, 4, 4], [1, 4, 4]]), 4)
    assert [(s, n) for s, n, _ in spans] == [(1, 4), (7, 4), (13, 4), (18, 4)]
    keys = [k for _, _, k in spans]
    assert len(set(keys[:3])) == 3 and b"v" not in keys[:3] and keys[3] == b"i"
    # the same video elsewhere in another prompt: the same keys (prefix reuse works across prompts)
    again = image_spans(ids((T, 5), (VID, 4), (T, 2), (VID, 4), (T, 2), (VID, 4)), (IMG, VID), [b"v"],
                        np.array([[3, 4, 4]]), 4)
    assert [k for _, _, k in again] == keys[:3]


@pytest.mark.parametrize("prompt,grid", [
    (ids((IMG, 4), (T, 1), (IMG, 4)), [[1, 4, 4]]),  # more placeholders than items
    (ids((IMG, 4)), [[1, 4, 4], [1, 4, 4]]),  # fewer
    (ids((IMG, 8)), [[1, 4, 4], [1, 4, 4]]),  # two items in one run
])
def test_mismatch_is_refused(prompt, grid):
    with pytest.raises(InvalidArgument):
        image_spans(prompt, (IMG, VID), [b"x"] * len(grid), np.array(grid), 4)
