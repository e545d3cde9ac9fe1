"""GPTQ and AWQ (gemm) checkpoints: int32-packed 4/8-bit weights, unpacked and dequantized per layer.

No maintained library installs beside this project's pins (gptqmodel >= 5, the only one transformers 5
loads GPTQ/AWQ through, requires numpy >= 2 and protobuf >= 6; the server needs numpy < 2 and
tritonclient[grpc] protobuf < 5: docs/QUANTIZATION.md), so tritonvl reads the two public formats itself:

- GPTQ (``quant_method: gptq``, ``checkpoint_format`` gptq = v1 or gptq_v2): per linear layer
  ``qweight`` int32 [in / (32/bits), out], ``bits``-bit codes packed along the input dim (code k of a
  word at bits k*bits); ``qzeros`` int32 [groups, out / (32/bits)], packed along the output dim, v1
  storing zero - 1; ``scales`` [groups, out]; ``g_idx`` int32 [in] (each input row's group: act-order
  checkpoints permute it). weight[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o]).
- AWQ gemm (``quant_method: awq``, ``version: gemm``; Qwen's own Qwen2.5-VL AWQ releases):
  ``qweight`` int32 [in, out / 8] and ``qzeros`` int32 [groups, out / 8], both packed along the
  output dim in AWQ's interleaved order (word bits 4k hold column ``AWQ_ORDER[k]`` of its eight);
  ``scales`` [groups, out]; groups are consecutive input rows; zero points always stored.

``PackedLinear`` keeps those tensors (what the checkpoint holds) and dequantizes its weight into a
temporary of the input's dtype in each forward; ``load_model`` builds the whole model with its
parameters on the meta device, swaps the decoder's quantized linear layers for PackedLinear and
assigns every tensor from the safetensors files, so no full-size decoder weight is ever allocated.
"""

from __future__ import annotations

import contextlib

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word bits 4k <- column AWQ_ORDER[k] of the eight it packs
GPTQ_BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")


class PackedConfigError(ValueError):
    """A GPTQ/AWQ quantization_config tritonvl cannot run: the message names the field."""


def parse_config(q: dict) -> dict:
    """The fields the unpacking needs from a gptq/awq ``quantization_config``, checked."""
    method = q["quant_method"]
    bits, group = q.get("bits"), q.get("group_size", 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise PackedConfigError(f"{method} group_size {group!r} is not a positive integer or -1")
    if method == "gptq":
        if bits not in GPTQ_BITS:
            raise PackedConfigError(f"gptq bits={bits!r} is not supported; tritonvl unpacks "
                                    f"{', '.join(map(str, GPTQ_BITS))}-bit GPTQ")
        fmt = q.get("checkpoint_format") or q.get("format") or "gptq"
        if fmt not in GPTQ_FORMATS:
            raise PackedConfigError(f"gptq checkpoint_format {fmt!r} is not supported; tritonvl reads "
                                    f"{', '.join(GPTQ_FORMATS)} (the int32 row-packed layout)")
        return {"method": "gptq", "bits": bits, "group_size": group, "v1": fmt == "gptq"}
    if method == "awq":
        if bits != 4:
            raise PackedConfigError(f"awq bits={bits!r} is not supported; tritonvl unpacks 4-bit AWQ (gemm)")
        version = str(q.get("version", q.get("format", "gemm"))).lower()
        if version != "gemm":
            raise PackedConfigError(f"awq version {version!r} is not supported; tritonvl reads AWQ's gemm "
                                    "packing (Qwen's AWQ releases)")
        if q.get("zero_point", True) is not True:
            raise PackedConfigError("awq zero_point=false is not supported; tritonvl reads asymmetric AWQ "
                                    "(zero points stored, as Qwen's AWQ releases)")
        return {"method": "awq", "bits": 4, "group_size": group}
    raise PackedConfigError(f"quant_method {method!r} is not gptq or awq")


def unpack_words(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their ``32 // bits`` unsigned codes each, laid out along ``dim`` (0: rows, as
    GPTQ's qweight; 1: columns, as qzeros and AWQ), code k of a word from bits k*bits."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if dim == 0:
        codes = torch.bitwise_right_shift(packed.unsqueeze(1), shifts.view(1, per, 1))
        codes = codes.reshape(packed.shape[0] * per, packed.shape[1])
    else:
        codes = torch.bitwise_right_shift(packed.unsqueeze(2), shifts.view(1, 1, per))
        codes = codes.reshape(packed.shape[0], packed.shape[1] * per)
    return torch.bitwise_and(codes, (1 << bits) - 1)


def _awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """AWQ-packed columns (in word order) -> natural column order."""
    inverse = [AWQ_ORDER.index(k) for k in range(8)]  # natural column k sits at word slot inverse[k]
    index = (torch.arange(codes.shape[1] // 8).view(-1, 1) * 8 + torch.tensor(inverse).view(1, 8)).reshape(-1)
    return codes[:, index.to(codes.device)]


class PackedLinear(torch.nn.Module):
    """A GPTQ / AWQ-gemm linear layer as the checkpoint stores it; forward = dequantize + matmul."""

    def __init__(self, spec: dict, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.spec, self.in_features, self.out_features = spec, in_features, out_features
        bits, group = spec["bits"], spec["group_size"]
        self.group_size = in_features if group == -1 else group
        if in_features % self.group_size:
            raise PackedConfigError(f"{spec['method']} group_size {group} does not divide in_features {in_features}")
        groups, per = in_features // self.group_size, 32 // bits
        if out_features % per or (spec["method"] == "gptq" and in_features % per):
            raise PackedConfigError(f"{spec['method']}: layer {in_features}x{out_features} is not a multiple of "
                                    f"{per} codes per int32 word")
        meta = {"device": "meta"}
        if spec["method"] == "gptq":
            self.register_buffer("qweight", torch.empty(in_features // per, out_features, dtype=torch.int32, **meta))
            self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, **meta))
        else:
            self.register_buffer("qweight", torch.empty(in_features, out_features // per, dtype=torch.int32, **meta))
        self.register_buffer("qzeros", torch.empty(groups, out_features // per, dtype=torch.int32, **meta))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, **meta))
        self.register_buffer("bias", torch.empty(out_features, **meta) if bias else None)

    def dequantize(self, dtype) -> torch.Tensor:
        """The full-size weight [out, in] in ``dtype``: scale * (code - zero), per group."""
        bits = self.spec["bits"]
        zeros = unpack_words(self.qzeros, bits, 1)
        if self.spec["method"] == "gptq":
            codes = unpack_words(self.qweight, bits, 0)  # [in, out]
            if self.spec["v1"]:  # GPTQ v1 stores zero - 1 (in the packed bits: wraps at 0)
                zeros = torch.bitwise_and(zeros + 1, (1 << bits) - 1)
            groups = None if self._groups_in_order() else self.g_idx.long()
        else:
            codes, zeros = _awq_columns(unpack_words(self.qweight, 4, 1)), _awq_columns(zeros)
            groups = None
        # in float32, rounded once to ``dtype`` (fp16 scales are not exact in bfloat16)
        scales = self.scales.to(torch.float32)
        if groups is None:  # consecutive rows per group: broadcast, no [in, out] gather of zeros/scales
            shape = (zeros.shape[0], self.group_size, self.out_features)
            weight = ((codes.view(shape) - zeros.unsqueeze(1)).to(torch.float32) * scales.unsqueeze(1))
            weight = weight.view(self.in_features, self.out_features)
        else:  # act-order: each input row's group from g_idx
            weight = (codes - zeros[groups]).to(torch.float32) * scales[groups]  # [in, out]
        return weight.to(dtype).t().contiguous()

    def _groups_in_order(self) -> bool:
        """GPTQ's g_idx is row // group_size (no act-order): checked once, after the tensors are loaded."""
        if getattr(self, "_in_order", None) is None:
            rows = torch.arange(self.in_features, device=self.g_idx.device)
            self._in_order = bool(torch.equal(self.g_idx.long(), rows // self.group_size))
        return self._in_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"{self.spec['method']} {self.spec['bits']}-bit, group {self.group_size}, "
                f"in_features={self.in_features}, out_features={self.out_features}")


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory); buffers stay real
    (the rotary inv_freq a model computes in __init__ and no checkpoint stores)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _model_key(key: str, names: set) -> str | None:
    """A checkpoint tensor's name in the model: as is, or from transformers 4.x's layout (``model.layers``
    -> ``model.language_model.layers``, ``visual.`` -> ``model.visual.``)."""
    for candidate in (key, "model.language_model." + key[len("model."):] if key.startswith("model.") else None,
                      "model." + key):
        if candidate in names:
            return candidate
    return None


def load_model(model_dir: str, cls, dtype, q: dict):
    """The whole model of a GPTQ/AWQ checkpoint: the decoder's quantized linear layers as PackedLinear
    (their tensors as stored), every other tensor (embeddings, norms, lm_head, the vision tower) cast
    to ``dtype``; refuses a checkpoint whose tensors do not fit the model."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    from tritonvl.handlers.weights import safetensor_files

    spec = parse_config(q)
    config = AutoConfig.from_pretrained(model_dir)
    config.quantization_config = None
    del config.quantization_config
    config._attn_implementation = "sdpa"
    with _parameters_on_meta():
        model = cls._from_config(config, dtype=dtype)
    files = safetensor_files(model_dir)
    stored = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored.update({k: path for k in f.keys()})
    decoder = model.model.language_model
    linears = {f"model.language_model.{n}.weight": n for n, m in decoder.named_modules()
               if isinstance(m, torch.nn.Linear)}
    chosen = {linears[t] for t in (_model_key(k[: -len("qweight")] + "weight", set(linears))
                                   for k in stored if k.endswith(".qweight")) if t is not None}
    for name in [n for n in linears.values() if n in chosen]:  # the model's order: the same first misfit every run
        module = decoder.get_submodule(name)
        decoder.set_submodule(name, PackedLinear(spec, module.in_features, module.out_features,
                                                 module.bias is not None))
    swapped = len(chosen)
    if swapped == 0:
        raise PackedConfigError(f"{model_dir} is {spec['method']} but none of its tensors (*.qweight) is a "
                                "linear layer of the decoder")
    names = set(model.state_dict().keys())
    state, unused = {}, []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                target = _model_key(key, names)
                if target is None:
                    unused.append(key)
                    continue
                t = f.get_tensor(key)
                if t.is_floating_point() and not key.endswith(".scales"):
                    t = t.to(dtype)
                state[target] = t
    if unused:
        raise PackedConfigError(f"{len(unused)} tensors of {model_dir} fit no part of the model: {unused[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    text = getattr(config, "text_config", config)
    if model.lm_head.weight.is_meta and (getattr(config, "tie_word_embeddings", False)
                                         or getattr(text, "tie_word_embeddings", False)):
        model.lm_head.weight = model.get_input_embeddings().weight
    empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if empty:
        raise PackedConfigError(f"{model_dir} has no tensor for {len(empty)} of the model's: {empty[:5]}")
    model.config.quantization_config = q  # what describe() reports
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        pass
    return model.eval(), swapped
