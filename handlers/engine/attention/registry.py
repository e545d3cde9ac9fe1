"""The attention backends by name, and ``select()``: the one place that picks a backend, checks a
kernel backend against sdpa on the real device at start-up, and falls back to sdpa under ``auto``.

How the engine reaches its attention (the hop that is not visible in the model code): ``register``
puts our function into transformers' ``AttentionInterface`` under a name of its own (``ATTN_NAME`` for the
first); the model runner sets ``config._attn_implementation`` to that name on the text model and its
layers, and passes the step's ``StepMeta`` as the ``tvl_meta=`` keyword to the text model's forward.
Each HF decoder layer (``Qwen2_5_VLAttention.forward``) looks up ``ALL_ATTENTION_FUNCTIONS[name]`` and
calls it with its query/key/value and the forward's ``**kwargs``, so ``tvl_meta`` arrives in our function.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .flash_attn import make_flash_attn
from .meta import SeqStep, build_meta
from .npu import make_npu
from .sdpa import sdpa_paged
from .triton_lang import make_triton

log = logging.getLogger("tritonvl.engine")

ATTN_NAME = "tritonvl_paged"  # our name in transformers' AttentionInterface


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[], Callable]
    device_types: tuple[str, ...]  # where it runs
    prefill: str  # "gathered" or "paged": the form of StepMeta its prefill rows need
    decode: str
    block_multiple: int = 1  # block_size must be a multiple of this
    default_block_size: int = 16
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("sdpa", lambda: sdpa_paged, ("cpu", "cuda", "npu"), "gathered", "gathered"),
    "flash_attn": Backend("flash_attn", make_flash_attn, ("cuda",), "paged", "paged", 256, 256,
                          (torch.float16, torch.bfloat16)),
    # OpenAI Triton (the kernel language); the user-facing name stays "triton"
    "triton": Backend("triton", make_triton, ("cuda",), "gathered", "paged", 16, 16),
    "npu": Backend("npu", make_npu, ("npu",), "gathered", "paged", 128, 128, (torch.float16, torch.bfloat16)),
}
AUTO_ORDER = ("flash_attn", "triton", "npu")  # kernel backends auto tries, best first; else sdpa


@dataclass(frozen=True)
class Selected:
    """The backend the engine runs with: its attention function, block size and why it was chosen."""

    backend: Backend
    fn: Callable
    block_size: int
    why: str


def unavailable(backend: Backend, device: str, dtype: torch.dtype, head_dim: int,
                block_size: int | None = None) -> str | None:
    """Why ``backend`` cannot run here with blocks of ``block_size`` tokens (None: its default)."""
    kind = torch.device(device).type
    if kind not in backend.device_types:
        return f"{backend.name} runs on {'/'.join(backend.device_types)}, not {kind}"
    if backend.dtypes and dtype not in backend.dtypes:
        return f"{backend.name} needs float16 or bfloat16, not {dtype}"
    if backend.name == "flash_attn" and (head_dim % 8 or head_dim > 256):
        return f"flash_attn needs head_dim % 8 == 0 and <= 256, got {head_dim}"
    if backend.name == "triton" and block_size and block_size & (block_size - 1):
        return f"triton needs block_size to be a power of two, got {block_size}"
    if block_size and block_size % backend.block_multiple:
        return f"{backend.name} needs block_size to be a multiple of {backend.block_multiple}, got {block_size}"
    try:
        backend.make()
    except Exception as exc:  # noqa: BLE001 - ImportError, or an ABI mismatch (OSError, RuntimeError)
        return f"{backend.name}: {type(exc).__name__}: {exc}"
    return None


def select(requested: str, device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
           block_size: int | None = None) -> Selected:
    """The backend to run with. ``auto``: the first kernel backend of AUTO_ORDER that can run here and
    agrees with sdpa on a test step, else sdpa (``why`` says what was skipped). A backend named
    explicitly that cannot run or fails its check raises ValueError naming the reason."""
    if requested == "auto":
        skipped = []
        for name in AUTO_ORDER:
            reason = unavailable(BACKENDS[name], device, dtype, head_dim, block_size)
            if reason is None:
                backend, why = BACKENDS[name], "auto"
                break
            skipped.append(reason)
        else:
            backend, why = BACKENDS["sdpa"], "auto (" + "; ".join(skipped) + ")"
    elif requested not in BACKENDS:
        raise ValueError(f"attention_backend {requested!r}: expected auto or one of {sorted(BACKENDS)}")
    else:
        reason = unavailable(BACKENDS[requested], device, dtype, head_dim, block_size)
        if reason is not None:
            raise ValueError(f"attention_backend {requested!r} cannot run: {reason}")
        backend, why = BACKENDS[requested], "requested"
    fn = backend.make()
    if backend.name != "sdpa":
        problem = self_check(backend, fn, device, dtype, heads, kv_heads, head_dim,
                             block_size or backend.default_block_size)
        if problem and requested != "auto":
            raise ValueError(f"attention_backend {requested!r} failed its start-up check: {problem}")
        if problem:
            log.warning("attention: %s; using sdpa", problem)
            backend, why, fn = BACKENDS["sdpa"], f"auto ({problem})", sdpa_paged
    chosen = Selected(backend, fn, block_size or backend.default_block_size, why)
    log.info("attention backend %s (%s), block_size %d", backend.name, why, chosen.block_size)
    return chosen


_NAMES: dict[Callable, str] = {}  # each function registered so far -> its name


def register(fn: Callable) -> str:
    """Register ``fn`` with transformers (see the module docstring) under a name of its own, and return
    that name: ATTN_NAME for the first function, ATTN_NAME_2, ... for others. Transformers' registry
    is process-wide, so one shared name would let the last engine built in a process (another
    backend, or a compiled step's dispatching wrapper) replace the function every other engine's
    layers call. The same function keeps its name."""
    from transformers import AttentionInterface

    name = _NAMES.get(fn)
    if name is None:
        name = ATTN_NAME if not _NAMES else f"{ATTN_NAME}_{len(_NAMES) + 1}"
        _NAMES[fn] = name
        AttentionInterface.register(name, fn)
    return name


class _Layer:
    def __init__(self, idx: int) -> None:
        self.layer_idx = idx


def self_check(backend: Backend, fn: Callable, device: str, dtype: torch.dtype, heads: int, kv_heads: int,
               head_dim: int, block_size: int, seed: int = 0) -> str | None:
    """Run ``fn`` and the portable backend on one random mixed step (a chunk of a longer prompt, a
    whole short prompt, two decodes) on ``device``; None when they agree, else what went wrong."""
    gen = torch.Generator().manual_seed(seed)
    # (start, n) per sequence: a second chunk with context, a fresh prompt, two decodes
    shapes = [(block_size + 3, 7), (0, 5), (2 * block_size + 1, 1), (4, 1)]
    need = [-(-(s + n) // block_size) for s, n in shapes]
    perm = torch.randperm(sum(need) + 2, generator=gen).tolist()  # scattered, non-contiguous blocks
    tables, parts, row = [], [], 0
    for (s, n), k in zip(shapes, need):
        tables.append(perm[:k])
        perm = perm[k:]
        parts.append(SeqStep(row, s, n, tables[-1]))
        row += n
    num_blocks = sum(need) + 2
    scale = 1.0 / math.sqrt(head_dim)
    q = torch.randn(1, heads, row, head_dim, generator=gen)
    k = torch.randn(1, kv_heads, row, head_dim, generator=gen)
    v = torch.randn(1, kv_heads, row, head_dim, generator=gen)
    old = torch.randn(2, 1, num_blocks * block_size, kv_heads, head_dim, generator=gen)
    try:
        ref_cache = old.clone().to(device)
        ref_meta = build_meta(BACKENDS["sdpa"], ref_cache, block_size, parts, device)
        ref, _ = sdpa_paged(_Layer(0), q.to(device), k.to(device), v.to(device), None, scale, tvl_meta=ref_meta)
        cache = old.to(device, dtype)
        meta = build_meta(backend, cache, block_size, parts, device)
        got, _ = fn(_Layer(0), q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), None, scale,
                    tvl_meta=meta)
        err = (got.float() - ref.float()).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this backend"
        return f"{backend.name} failed on a test step: {type(exc).__name__}: {exc}"
    tol = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not err <= tol:
        return f"{backend.name} differs from sdpa by {err:.3g} (> {tol}) on a test step"
    return None
