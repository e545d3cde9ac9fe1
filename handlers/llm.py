"""Pick and build the llm backend from the model's config parameters."""

from __future__ import annotations

from .devices import parse_dtype, prepare_device
from .modelinfo import load_model_info


def make_backend(cfg):
    """``cfg``: triton_adapter.ModelArgs (anything with ``param``, ``model_dir``, ``device``)."""
    from transformers import AutoTokenizer

    model_dir = cfg.model_dir()
    device, dtype = prepare_device(cfg.device())
    dtype = parse_dtype(cfg.param("dtype"), dtype)
    info = load_model_info(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kind = cfg.param("backend", "generate")
    if kind == "generate":
        from .generate_backend import GenerateBackend

        return GenerateBackend(model_dir, info, tokenizer, device, dtype)
    raise ValueError(f"backend {kind!r}: expected 'generate'")
