"""Pixel budgets: how many pixels (so how many image tokens) each image may take.

Qwen resizes every image with ``smart_resize`` into [min_pixels, max_pixels] (sides multiples of
28). Three sources, in increasing priority: the deployment (preprocess parameters min_pixels /
max_pixels, else the model's preprocessor_config.json), the request's ``mm_processor_kwargs`` JSON
(vLLM's name), and the keys of one image's message part (Qwen's convention). A request may lower
the deployment's bounds, never raise past them: a value above the deployment's is INVALID_ARG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tritonvl.client.rules.errors import InvalidArgument

KEYS = ("min_pixels", "max_pixels")  # for every image
VIDEO_KEYS = ("fps", "num_frames", "max_frames", "total_pixels")  # for every video (video_rules.options_of)


@dataclass(frozen=True)
class PixelBudget:
    min_pixels: int
    max_pixels: int

    def size(self) -> dict:
        """The image processor's ``size`` argument for these bounds."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}


def deployment_budget(processor_size: dict, min_pixels: int | None, max_pixels: int | None) -> PixelBudget:
    """The deployment's bounds: the parameters where set, else the model's own processor settings."""
    low = min_pixels if min_pixels is not None else int(processor_size["shortest_edge"])
    high = max_pixels if max_pixels is not None else int(processor_size["longest_edge"])
    if low > high:
        raise ValueError(f"preprocess min_pixels={low} is above max_pixels={high}")
    return PixelBudget(low, high)


def parse_kwargs(text: str | None) -> dict:
    """The ``mm_processor_kwargs`` input: a JSON object with min_pixels and/or max_pixels (images),
    fps, num_frames, max_frames, total_pixels (videos)."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidArgument("mm_processor_kwargs: not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("mm_processor_kwargs: expected a JSON object such as {\"max_pixels\": 200704}")
    # vLLM's snippets for Qwen video send do_sample_frames true: frames are always sampled here
    sample = obj.pop("do_sample_frames", True)
    if sample is not True:
        raise InvalidArgument(f"mm_processor_kwargs.do_sample_frames={json.dumps(sample)}: videos are always "
                              "sampled here (by fps or num_frames); send a frame list to give the frames yourself")
    unknown = sorted(set(obj) - set(KEYS) - set(VIDEO_KEYS))
    if unknown:
        known = list(KEYS + VIDEO_KEYS) + ["do_sample_frames"]
        raise InvalidArgument(f"mm_processor_kwargs: unknown key(s) {unknown}; known: {known}")
    return obj


def budget_for(deployment: PixelBudget, request: dict, part: dict, where: str) -> PixelBudget:
    """One image's bounds: ``part`` keys over ``request`` keys over the deployment's.

    Each given value must be a positive integer no larger than the deployment's value of the same
    key; min_pixels above max_pixels is refused when the request gave both, else min follows max down."""
    given = {}
    for source, label in ((request, "mm_processor_kwargs"), (part, where)):
        for key in KEYS:
            value = source.get(key)
            if value is None:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{label}.{key}: expected a positive integer, got {value!r}")
            bound = getattr(deployment, key)
            if value > bound:
                raise InvalidArgument(f"{label}.{key}={value} is above this deployment's {key} ({bound}): "
                                      "a request may lower the pixel budget, not raise it")
            given[key] = (value, label)
    high = given.get("max_pixels", (deployment.max_pixels, ""))[0]
    if "min_pixels" in given:
        low, label = given["min_pixels"]
        if low > high:
            raise InvalidArgument(f"{label}.min_pixels={low} is above max_pixels={high}")
    else:
        low = min(deployment.min_pixels, high)
    return PixelBudget(low, high)
