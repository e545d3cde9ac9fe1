"""Test videos made with PyAV (its bundled FFmpeg encoders) and Pillow (GIF)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

CODECS = {"mp4": ("mp4", "mpeg4"), "h264": ("mp4", "libx264"), "webm": ("webm", "libvpx")}


def frames_of(n: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """Smooth random frames that drift over time (lossy codecs keep them recognizable)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(height // 8, 2), max(width // 8, 2) + n, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        img = Image.fromarray(small[:, i:i + max(width // 8, 2)]).resize((width, height), Image.BILINEAR)
        out.append(np.asarray(img))
    return out


def make_video(n: int = 8, width: int = 112, height: int = 84, fps: int = 4, fmt: str = "mp4", seed: int = 0) -> bytes:
    frames = frames_of(n, width, height, seed)
    buf = io.BytesIO()
    if fmt == "gif":
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        return buf.getvalue()
    import av

    container_fmt, codec = CODECS[fmt]
    with av.open(buf, mode="w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def frame_list(n: int = 4, width: int = 112, height: int = 84, seed: int = 0) -> str:
    """A JSON list of PNG frames as data: URIs (the other shape of a video)."""
    import json

    uris = []
    for f in frames_of(n, width, height, seed):
        b = io.BytesIO()
        Image.fromarray(f).save(b, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(b.getvalue()).decode())
    return json.dumps(uris)


def intake(image_processor, limits):
    """A video element (and its part's keys) -> what the generate() references take: the rows the
    server's own intake builds (pixel values, grid, second_per_grid_t, frame times)."""
    from tritonvl.handlers.preprocess.images import ImageLimits
    from tritonvl.handlers.preprocess.video import Source, load_video, video_geometry
    from tritonvl.handlers.preprocess.video_rules import options_of

    geo = video_geometry(image_processor)

    def rows(item, part=None):
        v = load_video(Source(item, options_of(part or {}, "p", limits), "p"), limits, ImageLimits(), geo)
        return v.pixel_values, v.grid, v.second_per_grid_t, v.frame_times
    return rows
