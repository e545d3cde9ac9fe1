"""Media geometry: what the ``media_sizes`` output says about each image and video of a request
(docs/INTERFACE.md), and which grid a family's grounding coordinates are on (docs/CLIENT.md).

One JSON object per request, in the first response:
``{"family", "coordinates", "images": [{"width", "height", "resized_width", "resized_height"}],
"videos": [{..., "frame_times": [seconds]}]}``. ``width``/``height``: the image as decoded (EXIF
orientation applied); ``resized_*``: the size the model saw (Qwen's smart_resize with the request's
pixel budget); ``frame_times``: seconds into the video of each frame the model saw.
"""

from __future__ import annotations

# Where a family's boxes and points are (Qwen's cookbooks; QwenLM/Qwen2.5-VL issues #676, #947, #830):
ABSOLUTE = "absolute"  # pixels of the resized image the model saw (Qwen2.5-VL)
RELATIVE_1000 = "relative_1000"  # a 0-1000 grid over the whole image (Qwen2-VL, Qwen3-VL)
COORDINATES = {"qwen2_vl": RELATIVE_1000, "qwen2_5_vl": ABSOLUTE, "qwen3_vl": RELATIVE_1000,
               "qwen3_vl_moe": RELATIVE_1000}


def coordinates_of(family: str) -> str:
    """The grid of a family's grounding coordinates (``absolute`` or ``relative_1000``)."""
    try:
        return COORDINATES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(COORDINATES)})") from None
