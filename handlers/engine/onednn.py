"""oneDNN's packed fp32 GEMM on CPU: the decoder's linear layers and the output layer (output_head.py).

torch's ``F.linear`` runs an fp32 CPU product through MKL's sgemm. On AMD EPYC (AVX2) that reaches
about half of what the memory and the cores allow at the row counts of a decode step, where oneDNN
(the library OpenVINO and inductor's CPU linears use) keeps a copy of the weight in its own blocked
layout, chosen once at load for PACK_ROWS rows, and runs the product from it. The bench preset's 56
decoder linears (2 threads, ms, medians of 5 interleaved rounds, ``/tmp`` microbenchmark in the
session-9 note): rows 1: 13.9 MKL, 10.4 oneDNN; 8: 18.0, 13.0; 32: 32.3, 23.9; 64: 48.3, 35.6; 256
about equal. The sums are not bitwise those of MKL (neither are MKL's own for another row count: a
decode batch never was bitwise transformers' batch-1 product); parity with generate() is what the
tests hold it to.

``pack_linears`` swaps each plain fp32 ``nn.Linear`` of a module tree (the decoder's q/k/v/o and
gate/up/down) for a ``PackedLinear`` that holds only the packed copy: the original weight is let go,
so memory stays as it was. Sibling layers that read the same input (q/k/v, gate/up) are packed as one
product (``FusedProduct``): 4 oneDNN calls per decoder layer instead of 7; in-process bench preset,
text, batch 8: 235 -> 277 tok/s (two alternating runs each, AMD EPYC; batch 1 and 32 within noise).
Quantized layers (torchao tensor subclasses, compressed-tensors, GPTQ/AWQ
modules), other dtypes and other devices are left alone. llm parameter ``cpu_linear`` (torch: keep
MKL's) switches it off.

The compiled decode step (compiled.py) keeps them: inductor cannot trace oneDNN's opaque packed tensor,
so under ``torch.compile`` a PackedLinear calls the custom op ``tritonvl::onednn_linear`` with an integer
handle to its weight, opaque to the graph (as attention is). Siblings are not fused there: a
FusedProduct shares one product between calls through Python state that dynamo cannot trace. (Before,
compile=decode ran MKL's F.linear: 27 against 12 ms for the bench preset's 56 linears at 32 rows.)
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn as nn

PACK_ROWS = 32  # the batch size oneDNN's packed layout is chosen for (it serves every row count)


def pack(w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """oneDNN's packed copy of an fp32 [out, in] weight, checked against a plain product once; None
    where this torch has no oneDNN linear (or it disagrees)."""
    try:
        if not torch.backends.mkldnn.is_available() or w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        probe = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0))
        got = linear(probe, packed, bias)
        want = torch.nn.functional.linear(probe, w, bias)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return None
        return packed
    except (AttributeError, RuntimeError):
        return None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` from W's packed copy (x: [..., in] fp32)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# Packed layers by handle, for the compiled decoder (compiled.py): inductor cannot trace oneDNN's opaque
# packed tensors, so a compiled graph calls ``tritonvl::onednn_linear`` with an integer handle instead. Weak:
# a layer (and its packed weight) goes when its model goes.
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("tritonvl::onednn_linear", mutates_args=())
def linear_op(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    layer = _LAYERS[handle]
    return linear(x, layer.packed, layer.bias)


@linear_op.register_fake
def _(x, handle, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight lives only as oneDNN's packed copy."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.handle = next(_HANDLES)
        _LAYERS[self.handle] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return linear_op(x, self.handle, self.out_features)
        return linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def is_plain_fp32(m: nn.Module) -> bool:
    """A bias-optional ``nn.Linear`` with an ordinary fp32 CPU weight (not a quantized one in disguise)."""
    if type(m) is not nn.Linear or hasattr(m, "quantization_scheme") or hasattr(m, "weight_scale"):
        return False
    w, b = m.weight, m.bias
    plain = type(w) is nn.Parameter and type(w.data) is torch.Tensor and not w.is_meta
    return (plain and w.dtype == torch.float32 and w.device.type == "cpu"
            and (b is None or (type(b.data) is torch.Tensor and b.dtype == torch.float32)))


# Sibling layers that read the same input (a Qwen attention's q/k/v, an MLP's gate/up): packed as one
# product, one oneDNN call instead of three or two (vLLM's QKVParallelLinear / MergedColumnParallelLinear).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProduct:
    """One packed product of sibling layers: the first member called with an input computes all of
    them, the others take their slice of it for the same input object (the cache is dropped once every
    member took its part, so no activation outlives the layer's forward)."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]) -> None:
        self.packed, self.bias, self.sizes = packed, bias, sizes
        self._members = frozenset(range(len(sizes)))
        self._x: torch.Tensor | None = None
        self._parts: tuple = ()
        self._left: set[int] = set()

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if x is not self._x or i not in self._left:  # a new input, or this member's part was taken
            self._parts = linear(x, self.packed, self.bias).split(self.sizes, dim=-1)
            self._x, self._left = x, set(self._members)
        self._left.discard(i)
        out = self._parts[i]
        if not self._left:
            self._x, self._parts = None, ()
        return out


class FusedMember(nn.Module):
    """One of the sibling layers of a FusedProduct (an ``nn.Linear``'s interface)."""

    def __init__(self, product: FusedProduct, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.product, self.index = product, index
        self.in_features, self.out_features = in_features, out_features
        if index == 0:  # the packed copy shows among the module's buffers once (state, .to(), memory counts)
            self.register_buffer("packed", product.packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product.part(x, self.index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"part {self.index} of a fused product")


def _fuse_siblings(root: nn.Module) -> int:
    """Pack each complete set of SIBLINGS under ``root`` (plain fp32, same input width) as one product;
    the number of layers swapped."""
    swapped = 0
    for parent in list(root.modules()):
        for names in SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            if not all(is_plain_fp32(m) for m in layers) or len({m.in_features for m in layers}) != 1:
                continue
            w = torch.cat([m.weight.detach() for m in layers])
            with_bias = any(m.bias is not None for m in layers)
            bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in layers]) if with_bias else None
            packed = pack(w, bias)
            if packed is None:
                return swapped
            product = FusedProduct(packed, bias, [m.out_features for m in layers])
            for i, (n, m) in enumerate(zip(names, layers)):
                setattr(parent, n, FusedMember(product, i, m.in_features, m.out_features))
            swapped += len(layers)
    return swapped


def pack_linears(root: nn.Module, fuse: bool = True) -> int:
    """Swap every plain fp32 CPU ``nn.Linear`` under ``root`` for a PackedLinear (siblings reading the
    same input for members of one packed product), in the model's own order; the number swapped (0
    where oneDNN is not there)."""
    swapped = _fuse_siblings(root) if fuse else 0
    for name, m in list(root.named_modules()):
        if not is_plain_fp32(m):
            continue
        w = m.weight.detach()
        bias = None if m.bias is None else m.bias.detach()
        packed = pack(w, bias)
        if packed is None:
            return swapped
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr,
                PackedLinear(packed, bias, m.in_features, m.out_features))
        swapped += 1
    return swapped


# ---- int8: oneDNN's u8 x s8 GEMM with int32 sums (the output layer's greedy screen, output_head.py) ----

U8_ZERO = 128  # the activations' zero point: k in [-127, 127] goes in as the byte k + 128


def has_u8_gemm() -> bool:
    """oneDNN's int8 linear is there and this CPU sums u8 x s8 products in int32 without saturating
    (VNNI: AVX512-VNNI or AVX-VNNI; without it the int16 pair sums of AVX2 can saturate)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_vnni_supported()
                    and hasattr(torch.ops.onednn, "qlinear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def pack_u8(q: torch.Tensor, rows: int) -> torch.Tensor:
    """oneDNN's packed copy of an int8 [out, in] weight, for activations of about ``rows`` rows."""
    return torch.ops.onednn.qlinear_prepack(q, [rows, q.shape[1]])


def u8_linear(u: torch.Tensor, scale: float, packed: torch.Tensor, w_scales: torch.Tensor,
              w_zeros: torch.Tensor) -> torch.Tensor:
    """fp32 ``scale * (u - 128) @ (q * w_scales).T``: u [n, in] uint8; int32 sums, scaled on the way out."""
    return torch.ops.onednn.qlinear_pointwise(u, scale, U8_ZERO, packed, w_scales, w_zeros, None, 1.0, 0,
                                              torch.float32, "none", [None], "")
