"""Pick and build the llm backend from the model's config parameters."""

from __future__ import annotations

from tritonvl.handlers.devices import parse_dtype, prepare_device
from tritonvl.handlers.modelinfo import load_model_info


def make_backend(cfg, metrics=None):
    """``cfg``: triton_adapter.ModelArgs (anything with ``param``, ``model_dir``, ``device``)."""
    from transformers import AutoTokenizer

    model_dir = cfg.model_dir()
    device, dtype = prepare_device(cfg.device(), cfg.int_param("num_threads", 0))
    dtype = parse_dtype(cfg.param("dtype"), dtype)
    info = load_model_info(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kind = cfg.param("backend", "generate")
    if kind == "generate":
        from tritonvl.handlers.llm.generate import GenerateBackend

        return GenerateBackend(model_dir, info, tokenizer, device, dtype)
    if kind == "engine":
        from tritonvl.handlers.engine.engine import LLMEngine

        return LLMEngine(model_dir, info, tokenizer, device, dtype, int(cfg.param("kv_cache_bytes", "0") or 0),
                         kv_cache_fraction=float(cfg.param("kv_cache_fraction", "0.5") or 0.5),
                         block_size=cfg.int_param("block_size", 0) or None,
                         max_num_seqs=cfg.int_param("max_num_seqs", 64),
                         max_num_batched_tokens=cfg.int_param("max_num_batched_tokens", 2048),
                         max_model_len=cfg.int_param("max_model_len", 0) or None,
                         enable_prefix_caching=cfg.param("enable_prefix_caching", "true").lower() == "true",
                         max_waiting=cfg.int_param("max_waiting", 1024),
                         deadline_s=float(cfg.param("request_deadline_s", "600")),
                         attention=cfg.param("attention_backend", "auto") or "auto", metrics=metrics)
    raise ValueError(f"backend {kind!r}: expected 'engine' or 'generate'")

