"""The compiled decode step (``llm`` parameter ``compile``; docs/DEVICES.md, docs/BENCHMARKS.md).

``CompiledStep`` runs a decode-only step (every sequence one new token, no visual rows) through the
text decoder (``model.model.language_model``: embed, the HF layers, final norm) compiled with
``torch.compile`` (inductor, static shapes), the batch padded up to the next of a few bucket sizes.
Attention inside the graph is the ``tritonvl::paged_attention`` custom op (attention/custom_op.py),
so the whole decoder is one graph with the backend's own kernel left opaque. Everything is compiled
at load (``warm_up``: each bucket once, the time logged); on the request path dynamo runs with
``fail_on_recompile``, and a step that would need a new graph (a prefill or mixed step, a batch past
the largest bucket, a changed guard) runs the eager forward instead.

Padded rows: token 0 at position 0; the step's StepMeta covers the real rows only, so the op writes
K/V and attends for those alone and the padding never touches the cache of a real sequence. Every
op outside attention works row by row, so a real row's hidden state does not depend on the padding
(up to what a GEMM of a different row count computes: tests/unit/test_compiled_step.py checks the
tokens).

CUDA (untested here: written for a GPU, never run on one): with the ``triton`` attention backend
(the paged decode kernel reads its block table and lengths from tensors, so its launch is static)
each decode bucket is also captured as a ``torch.cuda.CUDAGraph`` over fixed input buffers
(``StaticDecode``: token ids, positions, slot mapping, block tables, lengths), as nano-vllm does;
replaying is one launch per step. Other CUDA backends (flash_attn) get the compiled graph without
capture.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from . import attention as attn
from .attention.custom_op import StaticDecode, dispatching, stepping

log = logging.getLogger("tritonvl.engine")

# Inductor settings the compiled step uses (see docs/BENCHMARKS.md "Compiled decode step" for why).
INDUCTOR_OPTIONS: dict = {}


def buckets_for(requested: tuple[int, ...], max_num_seqs: int) -> list[int]:
    """The decode batch sizes to compile: the requested ones up to the first that holds max_num_seqs."""
    out = []
    for b in sorted(set(requested)):
        out.append(b)
        if b >= max_num_seqs:
            break
    return out


class CompiledStep:
    def __init__(self, runner, buckets: list[int], max_model_len: int, static: bool | None = None) -> None:
        """``static`` None: CUDA graphs where they can be captured (CUDA, triton backend); True off
        CUDA runs the same static-buffer path uncaptured (tests)."""
        if not buckets:
            raise ValueError("compile: no decode bucket sizes (compile_buckets is empty)")
        self.runner = runner
        self.buckets = sorted(buckets)
        self.device = torch.device(runner.device)
        fn = runner.attn_fn  # the engine's backend function
        self.backend_fn = fn
        runner.use_attention(dispatching(fn))
        cache_limit = len(self.buckets) + 4
        if torch._dynamo.config.cache_size_limit < cache_limit:
            torch._dynamo.config.cache_size_limit = cache_limit
        lm = runner.lm

        def decoder(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            x = lm.embed_tokens(tokens)[None]
            out = lm(inputs_embeds=x, position_ids=positions, attention_mask={"full_attention": None},
                     use_cache=False)
            return out.last_hidden_state[0]

        self._compiled = torch.compile(decoder, dynamic=False, fullgraph=True, options=dict(INDUCTOR_OPTIONS) or None)
        if static is None:
            static = self.device.type == "cuda" and runner.backend.name == "triton"
        self.static = static
        self.cuda_graphs = static and self.device.type == "cuda"
        self.max_blocks = -(-max_model_len // runner.block_size)
        self._graphs: dict[int, _Graph] = {}
        self.compile_s = 0.0
        self.fallbacks = 0  # decode steps within the buckets that ran eager (a guard failed)
        self.steps = 0  # decode steps run compiled (or replayed)

    def bucket(self, rows: int) -> int | None:
        for b in self.buckets:
            if b >= rows:
                return b
        return None

    # ---- at load ----
    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (and on CUDA capture) every bucket; the seconds it took."""
        t0 = time.perf_counter()
        for b in self.buckets:
            t = time.perf_counter()
            if self.static:
                self._graphs[b] = self._capture(b)
            else:
                parts = [attn.SeqStep(i, 0, 1, [0]) for i in range(b)]  # context of one token, block 0
                meta = attn.build_meta(self.runner.backend, self.runner.kv_cache, self.runner.block_size, parts,
                                       self.device)
                tokens = torch.zeros(b, dtype=torch.long, device=self.device)
                positions = torch.zeros(3, 1, b, dtype=torch.long, device=self.device)
                with stepping(meta, self.backend_fn):
                    self._compiled(tokens, positions)
            log.info("compiled decode step: batch bucket %d in %.1f s%s", b, time.perf_counter() - t,
                     " (CUDA graph captured)" if self.cuda_graphs else "")
        self.compile_s = time.perf_counter() - t0
        log.info("compiled decode step: buckets %s ready in %.1f s", self.buckets, self.compile_s)
        return self.compile_s

    # ---- per step ----
    def forward(self, step) -> torch.Tensor | None:
        """The step's last hidden states [T, hidden], or None when it is not a compiled decode step."""
        parts = step.parts
        if step.visual_rows or any(p.n != 1 for p in parts):
            return None
        rows = len(parts)
        b = self.bucket(rows)
        if b is None:
            return None
        if self.static:
            hidden = self._graphs[b].replay(step, rows)
            self.steps += hidden is not None
            return hidden
        runner, dev = self.runner, self.device
        meta = attn.build_meta(runner.backend, runner.kv_cache, runner.block_size, parts, dev)
        tokens = torch.zeros(b, dtype=torch.long)
        tokens[:rows] = torch.tensor(step.tokens)
        positions = torch.zeros(3, 1, b, dtype=torch.long)
        positions[:, 0, :rows] = step.positions
        try:
            with stepping(meta, self.backend_fn), torch.compiler.set_stance("fail_on_recompile"):
                hidden = self._compiled(tokens.to(dev), positions.to(dev))
        except RuntimeError as exc:  # a guard failed: never compile on the request path
            if "recompile" not in str(exc).lower():
                raise
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("compiled decode step: batch %d ran eager (%s)", rows, str(exc).splitlines()[0])
            return None
        self.steps += 1
        return hidden[:rows]

    # ---- static buffers + CUDA graphs (the capture is untested: no GPU where this was written) ----
    def _capture(self, b: int) -> _Graph:
        """The bucket's fixed buffers, the compiled decoder run over them, and on CUDA a CUDAGraph of
        that run. Off CUDA (``static=True``, tests only) the same buffers are run without capture, so
        the buffer filling and the static attention path are checked on the CPU."""
        runner, dev = self.runner, self.device
        if dev.type == "cuda" and runner.backend.name == "triton":
            from .attention.triton_lang_decode import paged_decode as decode
        else:
            decode = paged_decode_torch
        static = StaticDecode(runner.kv_cache, runner.block_size,
                              slot_mapping=torch.zeros(b, dtype=torch.long, device=dev),
                              row_src=torch.zeros(b, dtype=torch.long, device=dev),
                              block_tables=torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev),
                              kv_lens=torch.ones(b, dtype=torch.int32, device=dev), decode=decode)
        tokens = torch.zeros(b, dtype=torch.long, device=dev)
        positions = torch.zeros(3, 1, b, dtype=torch.long, device=dev)
        if dev.type != "cuda":
            with stepping(static, None):
                out = self._compiled(tokens, positions)
            return _Graph(None, static, tokens, positions, out, self._compiled)
        with stepping(static, None):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile, then settle inductor's autotuning before capture
                    self._compiled(tokens, positions)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool()):
                out = self._compiled(tokens, positions)
        torch.cuda.synchronize()
        return _Graph(graph, static, tokens, positions, out, self._compiled)

    def _pool(self):
        if not hasattr(self, "_mempool"):
            self._mempool = torch.cuda.graph_pool_handle()
        return self._mempool


class _Graph:
    """One decode bucket's input buffers and its captured graph (None off CUDA: run, not replayed)."""

    def __init__(self, graph, static: StaticDecode, tokens, positions, out, compiled) -> None:
        self.graph, self.static, self.tokens, self.positions, self.out = graph, static, tokens, positions, out
        self.compiled = compiled

    def replay(self, step, rows: int) -> torch.Tensor | None:
        s, bs = self.static, self.static.block_size
        parts = step.parts
        dev = self.tokens.device
        ends = [p.start + 1 for p in parts]
        used = [-(-e // bs) for e in ends]
        width = max(used)
        if width > s.block_tables.shape[1]:
            return None
        tables = torch.zeros(rows, width, dtype=torch.long)
        for i, p in enumerate(parts):
            tables[i, :used[i]] = torch.tensor(p.block_table[:used[i]])
        pos = torch.tensor([p.start for p in parts])
        slots = tables[torch.arange(rows), pos // bs] * bs + pos % bs
        self.tokens.zero_()
        self.tokens[:rows] = torch.tensor(step.tokens).to(dev)
        self.positions.zero_()
        self.positions[:, 0, :rows] = step.positions.to(dev)
        s.slot_mapping.fill_(int(slots[0]))  # padding repeats row 0's write (row_src 0): same slot, same values
        s.slot_mapping[:rows] = slots.to(dev)
        s.row_src.zero_()
        s.row_src[:rows] = torch.arange(rows).to(dev)
        s.block_tables.zero_()
        s.block_tables[:rows, :width] = tables.to(dev, torch.int32)
        s.kv_lens.zero_()
        s.kv_lens[:rows] = torch.tensor(ends, dtype=torch.int32).to(dev)
        if self.graph is not None:
            self.graph.replay()
            return self.out[:rows].clone()
        with stepping(s, None), torch.compiler.set_stance("fail_on_recompile"):
            return self.compiled(self.tokens, self.positions)[:rows]


def paged_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The paged decode kernel's contract in plain torch, static shapes (every block of the table
    read, masked by ``lens``; a row of length 0 gives zeros): the stand-in for the CPU test of the
    static path. q [B, H, D]; k/v_cache [num_blocks, block_size, KVH, D]; block_tables [B, W]."""
    batch, heads, dim = q.shape
    _, bs, kvh, _ = k_cache.shape
    idx = block_tables.long()
    k = k_cache[idx].reshape(batch, -1, kvh, dim).transpose(1, 2)  # [B, KVH, W*bs, D]
    v = v_cache[idx].reshape(batch, -1, kvh, dim).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens.long()[:, None]  # [B, W*bs]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=heads != kvh)[:, :, 0]
    return torch.where((lens > 0)[:, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))


def _utf8_locale() -> None:
    """Inductor reads its templates with open()'s default encoding (torch 2.13: _inductor/utils.py
    load_template), which fails in tritonserver's Python stubs where the locale is C (ASCII):
    UnicodeDecodeError at the first compile. Switch this process's LC_CTYPE to UTF-8 first."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue
    log.warning("compiled decode step: no UTF-8 locale to switch to; inductor may fail to read its templates")


def build(runner, mode: str, buckets: tuple[int, ...], max_num_seqs: int, max_model_len: int) -> CompiledStep | None:
    """The engine's hook: ``mode`` "none" -> None; "decode" -> a CompiledStep, warmed up."""
    if mode == "none":
        return None
    _utf8_locale()
    step = CompiledStep(runner, buckets_for(buckets, max_num_seqs), max_model_len)
    try:
        step.warm_up()
    except Exception as exc:
        raise ValueError(f"compile={mode}: compiling the decode step failed: {type(exc).__name__}: {exc}") from exc
    # the stub's log (tritonserver's) shows stderr, not the tritonvl logger's INFO records
    print(f"tritonvl llm: compiled decode step: buckets {step.buckets} ready in {step.compile_s:.1f} s"
          f"{' (CUDA graphs)' if step.cuda_graphs else ''}", file=sys.stderr, flush=True)
    return step
