"""The vision tower's patch embedding as one matmul (handlers/vision/patch_matmul.py): the same values
as transformers' Conv3d (fp32 rounding apart), swapped only where the Conv3d steps by its own kernel,
and only in float32 towers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tritonvl.handlers.vision.patch_matmul import PatchMatmul, is_patch_conv, patch_embedding_as_matmul  # noqa: E402


@pytest.mark.parametrize("bias", [False, True])  # Qwen2/2.5-VL: no bias; Qwen3-VL: bias
def test_matmul_equals_the_convolution(bias):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv3d(3, 32, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=bias)
    x = torch.randn(50, 3, 2, 14, 14, generator=g)
    with torch.inference_mode():
        want, got = conv(x), PatchMatmul(conv)(x)
    assert got.shape == want.shape == (50, 32, 1, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inputs_larger_than_one_kernel_still_convolve():
    conv = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True)
    x = torch.randn(2, 3, 4, 8, 12)
    with torch.inference_mode():
        assert torch.equal(PatchMatmul(conv)(x), conv(x))


def test_only_a_convolution_that_steps_by_its_kernel_is_swapped():
    assert is_patch_conv(torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4)))
    assert not is_patch_conv(torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(1, 4, 4)))
    assert not is_patch_conv(torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), padding=1))
    assert not is_patch_conv(torch.nn.Conv3d(4, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), groups=2))
    assert not is_patch_conv(torch.nn.Conv2d(3, 8, kernel_size=4, stride=4))
    tower = torch.nn.Module()
    assert not patch_embedding_as_matmul(tower)  # no patch_embed: left alone


def test_float32_tower_embeds_like_transformers_tower(model_dir):
    """As close to the float64 tower as transformers' own float32 tower is (the same rounding, another
    order of the sums)."""
    from tritonvl.handlers.modelinfo import load_model_info
    from tritonvl.handlers.vision.encoder import TorchTower
    from tritonvl.handlers.weights import load_visual

    ours = TorchTower(str(model_dir), "cpu", torch.float32)
    assert isinstance(ours.visual.patch_embed.proj, PatchMatmul)
    ref = load_visual(str(model_dir), "cpu", torch.float32)
    exact = load_visual(str(model_dir), "cpu", torch.float64)
    assert type(ref.patch_embed.proj) is torch.nn.Conv3d
    grid = torch.tensor([[1, 8, 12], [1, 4, 4], [2, 4, 8]])  # two images and a two-frame video
    rows = int(grid.prod(dim=1).sum())
    pixels = torch.randn(rows, load_model_info(str(model_dir)).patch_dim, generator=torch.Generator().manual_seed(0))
    got = torch.from_numpy(ours(pixels.numpy(), grid.numpy())).double()
    with torch.inference_mode():
        want = ref(pixels, grid_thw=grid).pooler_output.double()
        truth = exact(pixels.double(), grid_thw=grid).pooler_output
    ours_err, theirs_err = (got - truth).norm() / truth.norm(), (want - truth).norm() / truth.norm()
    assert ours_err < 1e-5 and ours_err < 3 * theirs_err, (ours_err, theirs_err)


def test_bfloat16_tower_keeps_transformers_convolution(model_dir):
    from tritonvl.handlers.vision.encoder import TorchTower

    assert type(TorchTower(str(model_dir), "cpu", torch.bfloat16).visual.patch_embed.proj) is torch.nn.Conv3d
