"""The vision tower as the vision_encoder loads it (its own weights only) against the tower inside
transformers' whole model, in bfloat16: the same buffers' dtypes (the rotary frequencies stay
float32, as transformers' loader keeps them) and the same embeddings bit for bit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_tower_alone_equals_transformers_tower_in_bfloat16(model_dir):
    from tritonvl.handlers.modelinfo import load_model_info
    from tritonvl.handlers.weights import load_visual, model_class

    ours = load_visual(str(model_dir), "cpu", torch.bfloat16)
    whole = model_class(str(model_dir), 2).from_pretrained(str(model_dir), dtype=torch.bfloat16)
    ref = whole.model.visual.eval()
    assert {n: b.dtype for n, b in ours.named_buffers()} == {n: b.dtype for n, b in ref.named_buffers()}
    grid = torch.tensor([[1, 8, 12], [1, 4, 4]])
    rows = int(grid.prod(dim=1).sum())
    pixels = torch.randn(rows, load_model_info(str(model_dir)).patch_dim,
                         generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        a = ours(pixels, grid_thw=grid).pooler_output
        b = ref(pixels, grid_thw=grid).pooler_output
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b)
