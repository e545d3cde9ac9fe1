"""Paged attention behind one small interface, used by the HF decoder layers through transformers'
AttentionInterface (our function replaces theirs; the layers and weights stay HF's). How the layers
reach it: ``registry.py``'s docstring.

- ``meta.py``: ``StepMeta`` (where each new token's K/V goes, what each sequence attends to) and
  ``build_meta``, once per step.
- ``common.py``: K/V write, the paged view, the gathered prefill path, ``with_decode``.
- one file per backend: ``sdpa.py`` (portable: CPU, CUDA, NPU), ``flash_attn.py`` (CUDA with
  flash-attn), ``triton_lang.py`` + ``triton_lang_decode.py`` (CUDA via OpenAI Triton, our paged
  decode kernel; the backend's name is ``triton``), ``npu.py`` (Ascend, torch_npu).
- ``registry.py``: ``BACKENDS``, ``unavailable``, and ``select()``: choice, the start-up self-check of
  a kernel backend against sdpa on the real device, and the fallback to sdpa.
"""

from .common import with_decode
from .flash_attn import make_flash_attn
from .meta import PrefillPart, SeqStep, StepMeta, build_meta
from .npu import make_npu
from .registry import ATTN_NAME, BACKENDS, Backend, Selected, register, select, self_check, unavailable
from .sdpa import sdpa_paged
from .triton_lang import make_triton

__all__ = ["ATTN_NAME", "BACKENDS", "Backend", "PrefillPart", "SeqStep", "Selected", "StepMeta", "build_meta",
           "make_flash_attn", "make_npu", "make_triton", "register", "sdpa_paged", "select", "self_check",
           "unavailable", "with_decode"]
