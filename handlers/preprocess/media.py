"""The ``media_sizes`` output: each image's and video's size as sent and as the model saw it (and a
video's frame times), so that a client can map grounding coordinates back to the original pixels
without re-implementing Qwen's resize (the JSON's shape: client/rules/media.py, docs/INTERFACE.md)."""

from __future__ import annotations

import json

import numpy as np

from tritonvl.client.rules.media import coordinates_of


def media_sizes(family: str, patch: int, image_sizes: list[tuple[int, int]], image_grid: np.ndarray,
                clips: list) -> str:
    """One request's geometry as compact JSON. ``image_sizes``: (width, height) of each decoded image;
    ``image_grid``: [images, 3] (t, h, w) in patches, in the same order (smart_resize makes each side
    a multiple of ``patch``, so patches x ``patch`` is the resized side exactly); ``clips``: VideoRows."""
    images = [{"width": int(w), "height": int(h), "resized_width": int(g[2]) * patch,
               "resized_height": int(g[1]) * patch} for (w, h), g in zip(image_sizes, image_grid)]
    videos = [{"width": int(c.size[0]), "height": int(c.size[1]), "resized_width": int(c.grid[2]) * patch,
               "resized_height": int(c.grid[1]) * patch, "frame_times": [round(float(t), 3) for t in c.frame_times]}
              for c in clips]
    return json.dumps({"family": family, "coordinates": coordinates_of(family), "images": images,
                       "videos": videos}, separators=(",", ":"))
