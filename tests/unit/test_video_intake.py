"""Video intake (handlers/preprocess/video.py): Qwen's patch layout, qwen-vl-utils' sampling rules,
decoding with PyAV, and refusals."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from videos import frame_list, make_video

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.preprocess.images import ImageLimits
from tritonvl.handlers.preprocess.video import Source, load_video
from tritonvl.handlers.preprocess.video_rules import (
    Geometry,
    VideoLimits,
    options_of,
    patch_times,
    patchify,
    sample_count,
    target_size,
)

GEO = Geometry(14, 2, 2, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SMALL = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, total_pixels=64 * 28 * 28)


def transformers_patchify():
    """transformers' own Qwen2VLVideoProcessor.patchify, compiled from its source file: the module
    imports torchvision, which does not import here, so the one method is taken out with ast."""
    import torch
    import transformers

    path = Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    fn.decorator_list = []
    scope = {"torch": torch}
    exec(compile(ast.fix_missing_locations(ast.Module([fn], [])), str(path), "exec"), scope)
    return scope["patchify"]


@pytest.mark.parametrize("frames,h,w,patch", [(4, 56, 84, 14), (5, 112, 56, 14), (6, 64, 96, 16), (2, 28, 28, 14)])
def test_patchify_equals_transformers(frames, h, w, patch):
    import torch

    video = np.random.default_rng(frames).standard_normal((frames, 3, h, w)).astype(np.float32)
    want, t, gh, gw = transformers_patchify()(None, torch.from_numpy(video)[None], patch, 2, 2)
    rows, grid = patchify(video, patch, 2, 2)
    assert grid.tolist() == [t, gh, gw]
    assert np.array_equal(rows, want[0].numpy())


def test_sampling_rules_like_qwen_vl_utils():
    lim = VideoLimits()
    # 30 frames at 10 fps, 2 fps asked: 6 frames
    assert sample_count(30, 10.0, {}, lim, 2, "v") == 6
    # a 1 s clip: fps would give 2, the floor of 4 frames wins
    assert sample_count(10, 10.0, {}, lim, 2, "v") == 4
    # max_frames caps, floored to the temporal patch
    assert sample_count(300, 10.0, {"max_frames": 9}, lim, 2, "v") == 8
    # num_frames is rounded to the temporal patch
    assert sample_count(30, 10.0, {"num_frames": 7}, lim, 2, "v") == 8
    with pytest.raises(InvalidArgument, match="12 frames to sample from a video of 10"):
        sample_count(10, 10.0, {"num_frames": 12}, lim, 2, "v")
    with pytest.raises(InvalidArgument, match="no frame rate"):
        sample_count(10, None, {}, lim, 2, "v")


def test_frame_budget_shrinks_with_more_frames():
    few = target_size(280, 420, 4, {}, SMALL, GEO, "v")
    many = target_size(280, 420, 16, {}, SMALL, GEO, "v")
    assert few[0] * few[1] <= SMALL.max_pixels and many[0] * many[1] < few[0] * few[1]
    assert all(side % 28 == 0 for side in few + many)


@pytest.mark.parametrize("fmt", ["mp4", "h264", "webm", "gif"])
def test_decoded_video_rows(fmt):
    data = make_video(n=12, fps=4, fmt=fmt)
    out = load_video(Source(data, {"fps": 2}, "video[0]"), SMALL, ImageLimits(), GEO)
    # 12 frames at 4 fps = 3 s; 2 fps -> 6 frames -> 3 temporal patches, second_per_grid_t = 2 / 2
    assert out.grid[0] == 3 and out.second_per_grid_t == pytest.approx(1.0)
    assert out.pixel_values.shape == (int(np.prod(out.grid)), 3 * 2 * 14 * 14)


def test_frame_list_and_num_frames():
    out = load_video(Source(frame_list(5), {}, "video[0]"), SMALL, ImageLimits(), GEO)
    assert out.grid[0] == 3  # 5 frames padded to 6 with the last one
    assert out.second_per_grid_t == pytest.approx(2 / SMALL.fps)
    out = load_video(Source(make_video(n=20, fps=10), {"num_frames": 6}, "v"), SMALL, ImageLimits(), GEO)
    assert out.grid[0] == 3 and out.second_per_grid_t == pytest.approx(2 / (6 / 20 * 10))


@pytest.mark.parametrize("item,opts,message", [
    (b"\x00\x01garbage" * 50, {}, "not a decodable video"),
    (make_video()[:300], {}, "video"),
    ("data:video/mp4;base64,@@@", {}, "invalid base64"),
    ("data:text/plain;base64,aGVsbG8=", {}, "is not a video"),
    ("https://example.com/a.mp4", {}, "URLs are not accepted"),
    ("[]", {}, "frame list is empty"),
    ("\ud800", {}, "not valid Unicode"),  # a JSON string may hold a lone surrogate
    (["\udfff"], {}, "video\\[0\\]\\[0\\]: not valid Unicode"),
    (json.dumps(["not-an-image"]), {}, "video\\[0\\]\\[0\\]"),
    (make_video(n=4, fps=4), {"num_frames": 8}, "8 frames to sample from a video of 4"),
])
def test_bad_videos_refused(item, opts, message):
    with pytest.raises(InvalidArgument, match=message):
        load_video(Source(item, opts, "video[0]"), SMALL, ImageLimits(), GEO)


def test_limits_before_decoding():
    data = make_video(n=40, fps=4)  # 10 s
    with pytest.raises(InvalidArgument, match="longer than the 5 s limit"):
        load_video(Source(data, {}, "v"), VideoLimits(max_seconds=5), ImageLimits(), GEO)
    with pytest.raises(InvalidArgument, match="more than 20 frames"):
        load_video(Source(data, {}, "v"), VideoLimits(max_frames=20), ImageLimits(), GEO)
    with pytest.raises(InvalidArgument, match="over the 1000-pixel limit"):
        load_video(Source(data, {}, "v"), SMALL, ImageLimits(max_pixels=1000), GEO)
    with pytest.raises(InvalidArgument, match="larger than the 100-byte limit"):
        load_video(Source(data, {}, "v"), VideoLimits(max_bytes=100), ImageLimits(), GEO)


def test_part_keys_checked():
    assert options_of({"fps": 1.5, "max_pixels": 3136}, "p", SMALL) == {"fps": 1.5, "max_pixels": 3136}
    assert options_of({"nframes": 4.0}, "p", SMALL) == {"num_frames": 4}
    with pytest.raises(InvalidArgument, match="may lower the video budget"):
        options_of({"max_pixels": SMALL.max_pixels + 1}, "p", SMALL)
    with pytest.raises(InvalidArgument, match="fps or num_frames, not both"):
        options_of({"fps": 1, "num_frames": 4}, "p", SMALL)
    with pytest.raises(InvalidArgument, match="expected a positive number"):
        options_of({"fps": "fast"}, "p", SMALL)


def test_frame_times_follow_the_sampled_frames():
    # 8 frames at 8 fps, 2 fps asked -> the 4-frame floor: frames 0, 2, 5, 7 (evenly over the clip)
    clip = load_video(Source(make_video(n=8, fps=8, seed=1), {}, "v"), SMALL, ImageLimits(), GEO)
    assert clip.frame_times == pytest.approx([0.0, 2 / 8, 5 / 8, 7 / 8])
    assert clip.patch_seconds() == pytest.approx([0.125, 0.75])
    # a frame list of 3 at fps 1: padded with its last frame, as the rows are
    frames = json.loads(frame_list(3, seed=2))
    clip = load_video(Source(frames, {"fps": 1}, "v"), SMALL, ImageLimits(), GEO)
    assert clip.frame_times == [0.0, 1.0, 2.0, 2.0] and clip.patch_seconds() == [0.5, 2.0]


@pytest.mark.parametrize("indices,fps", [([0, 2, 5, 7], 8.0), ([0, 10, 20], 24.0), ([3], 2.0), (list(range(9)), 29.97)])
def test_patch_times_equal_transformers_qwen3_timestamps(indices, fps):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    want = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
    assert patch_times([i / fps for i in indices], 2) == pytest.approx(want)


def test_unset_frame_areas_follow_the_model_factor():
    assert VideoLimits().resolved(28) == VideoLimits(min_pixels=128 * 784, max_pixels=768 * 784, total_pixels=24576 * 784)
    assert VideoLimits().resolved(32).max_pixels == 768 * 32 * 32
    assert VideoLimits(max_pixels=5000).resolved(32).max_pixels == 5000
