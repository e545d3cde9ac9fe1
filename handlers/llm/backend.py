"""Pick and build the llm backend from the model's typed parameters (handlers/params.py LLMParams)."""

from __future__ import annotations

from tritonvl.handlers.devices import parse_dtype, prepare_device, tp_devices
from tritonvl.handlers.modelinfo import load_model_info


def make_backend(model_args, metrics=None):
    """``model_args``: tritonserver.adapter.ModelArgs (``params``: LLMParams, ``model_dir()``, ``device()``)."""
    from transformers import AutoTokenizer

    p = model_args.params
    model_dir = model_args.model_dir()
    device, dtype = prepare_device(model_args.device(), p.num_threads)
    dtype = parse_dtype(p.dtype, dtype)
    info = load_model_info(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if p.backend == "generate" and p.tensor_parallel_size > 1:
        raise ValueError("tensor_parallel_size > 1 needs backend engine (generate() runs on one device)")
    if p.backend == "generate":
        from tritonvl.handlers.llm.generate import GenerateBackend

        # its load refuses llm.quantization (quant.check_serving: generate() would run the unquantized model)
        return GenerateBackend(model_dir, info, tokenizer, device, dtype, p.quantization)
    from tritonvl.handlers.engine.engine import LLMEngine

    devices = ()
    if p.tensor_parallel_size > 1:  # handlers/engine/parallel.py; docs/DEVICES.md
        if getattr(p, "compile", "none") != "none":
            raise ValueError("tensor_parallel_size > 1 with compile is not supported yet; use compile none")
        devices = tp_devices(device, p.tensor_parallel_size, model_args.kind, model_args.instance_name,
                             ",".join(map(str, p.npu_device_ids)))
    return LLMEngine(model_dir, info, tokenizer, device, dtype, p, metrics=metrics, devices=devices)
