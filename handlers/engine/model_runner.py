"""Runs one engine step: a packed row of prefill chunks and decode tokens through HF's decoder.

Per step: token embeddings with image/video embeddings scattered at their placeholder positions,
3-row mRoPE positions (the model's rope index for prompt positions; later position n gets
n + rope_delta on all rows), Qwen3-VL's deepstack features for the visual rows of the step, K/V
written to the paged cache, logits only for the rows that sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers import quant
from tritonvl.handlers.devices import free_device_bytes
from tritonvl.handlers.engine.scheduler import ScheduledBatch
from tritonvl.handlers.modelinfo import ModelInfo
from tritonvl.handlers.weights import load_full_model

from . import attention as attn
from . import onednn, parallel
from .output_head import OutputHead, first_argmax
from .visual import grid_kinds, mm_token_types


@dataclass
class SeqInputs:
    """What the runner needs about one sequence's prompt (kept in ``seq.payload.inputs``)."""

    prompt_positions: torch.Tensor  # [3, L] long (CPU)
    rope_delta: int
    visual_positions: torch.Tensor  # [n_visual_tokens] long: prompt positions of image/video placeholders (sorted)
    visual_embeds: torch.Tensor | None  # [n_visual_tokens, hidden] on the device
    deepstack: torch.Tensor | None = None  # Qwen3-VL: [n_visual_tokens, layers, hidden] on the device


@dataclass
class PackedStep:
    """One step's sequences as a single row of T tokens (ModelRunner.pack)."""

    positions: torch.Tensor  # [3, T] long: mRoPE positions
    tokens: list[int] = field(default_factory=list)  # [T]
    parts: list = field(default_factory=list)  # attn.SeqStep per sequence: its rows, start and blocks
    visual_rows: list[torch.Tensor] = field(default_factory=list)  # rows of the step that take visual embeds
    visual_src: list[torch.Tensor] = field(default_factory=list)  # ...and those embeds, in the same order
    deep_src: list[torch.Tensor] = field(default_factory=list)  # Qwen3-VL deepstack features of those rows
    sample_rows: list[int] = field(default_factory=list)  # the last row of each sequence that samples
    sample_ids: list[int] = field(default_factory=list)  # ...and its seq_id

    def add_visual(self, inputs: SeqInputs, row: int, start: int, end: int) -> None:
        """The sequence's visual rows among prompt positions [start, end), placed at step row ``row``."""
        vp = inputs.visual_positions
        lo, hi = torch.searchsorted(vp, start), torch.searchsorted(vp, end)
        if hi > lo:
            self.visual_rows.append(vp[lo:hi] - start + row)
            self.visual_src.append(inputs.visual_embeds[lo:hi])
            if inputs.deepstack is not None:
                self.deep_src.append(inputs.deepstack[lo:hi])

    def to_wire(self) -> dict:
        """What a tensor-parallel worker needs to run this step's forward (CPU tensors, picklable)."""
        return {"positions": self.positions, "tokens": self.tokens, "parts": self.parts,
                "visual_rows": [t.cpu() for t in self.visual_rows], "visual_src": [t.cpu() for t in self.visual_src],
                "deep_src": [t.cpu() for t in self.deep_src]}

    @classmethod
    def from_wire(cls, wire: dict, device) -> PackedStep:
        return cls(wire["positions"], wire["tokens"], wire["parts"], wire["visual_rows"],
                   [t.to(device) for t in wire["visual_src"]], [t.to(device) for t in wire["deep_src"]])


class ModelRunner:
    """``kv_cache_bytes`` 0: ``kv_cache_fraction`` of the device memory free once the weights are
    loaded. ``block_size`` None: the attention backend's default."""

    compiled = None  # a compiled.CompiledStep (llm parameter compile), set by the engine after loading

    def __init__(self, model_dir: str, info: ModelInfo, device: str, dtype, kv_cache_bytes: int,
                 block_size: int | None = None, attention: str = "auto", kv_cache_fraction: float = 0.5,
                 quantization: str = "none", tp: parallel.TPGroup | None = None,
                 tp_devices: tuple[str, ...] = (), cpu_linear: str = "onednn", cpu_linear_fuse: bool = True,
                 greedy_screen: bool = True) -> None:
        self.info, self.device, self.dtype = info, device, dtype
        size = tp.size if tp else max(len(tp_devices), 1)  # tensor parallelism: engine/parallel.py
        parallel.check_size(info.family, info.num_heads, info.num_kv_heads, size, quantization)
        chosen = attn.select(attention, device, dtype, info.num_heads // size, info.num_kv_heads // size,
                             info.head_dim, block_size)
        self.backend, self.block_size = chosen.backend, chosen.block_size
        block_size = chosen.block_size
        self.tp = tp
        if size > 1 and tp is None:  # rank 0: start the other ranks, which load beside it
            self.tp = parallel.TPGroup.launch(list(tp_devices), {
                "model_dir": model_dir, "dtype": str(dtype).removeprefix("torch."), "kv_cache_bytes": kv_cache_bytes,
                "block_size": block_size, "attention": chosen.backend.name, "kv_cache_fraction": kv_cache_fraction,
                "num_threads": torch.get_num_threads()})
        if self.tp is None:
            model = load_full_model(model_dir, device, dtype, quantization)
        else:
            model = parallel.load_shard(model_dir, device, dtype, self.tp)
        self.weights = quant.describe(model, quantization)  # llm.quantization and the decoder's bytes
        model.model.visual = None  # the vision_encoder model owns the tower
        self.model = model
        self.lm = model.model.language_model
        if cpu_linear == "onednn" and self.tp is None:  # plain fp32 CPU linears only (onednn.py)
            onednn.pack_linears(self.lm, fuse=cpu_linear_fuse)
        # the output layer (on CPU re-laid in vocabulary blocks; an untied weight released): output_head.py;
        # none on a tensor-parallel worker (rank 0 alone samples)
        self.head = None if model.lm_head is None else OutputHead.build(model.lm_head, device, self.lm.embed_tokens,
                                                                        screen=greedy_screen)
        self.attn_fn = chosen.fn  # the backend's attention function
        self.use_attention(chosen.fn)
        per_token = info.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) // size
        if not kv_cache_bytes:
            kv_cache_bytes = free_device_bytes(device, kv_cache_fraction)
        self.num_blocks = max(int(kv_cache_bytes // (per_token * block_size)), 1)
        if self.tp is not None:  # every rank's cache holds the same blocks (of its own KV heads)
            self.num_blocks = self.tp.all_min(self.num_blocks)
        self.kv_cache = torch.zeros(2, info.num_layers, self.num_blocks * block_size, info.num_kv_heads // size,
                                    info.head_dim, dtype=dtype, device=device)

    def keepalive(self) -> None:
        """The engine is idle: tensor-parallel workers hear from rank 0 now and then (parallel.py)."""
        if self.tp is not None:
            self.tp.keepalive()

    @property
    def broken(self) -> str | None:
        """Why this runner cannot run a step any more (a tensor-parallel rank failed), else None."""
        return self.tp.broken if self.tp is not None else None

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do without them)."""
        if self.tp is not None:
            self.tp.close()

    # ---- per sequence, once ----
    def prepare(self, input_ids: np.ndarray, visual_embeds: np.ndarray, grid_thw: np.ndarray,
                second_per_grid_ts: list[float] | tuple = ()) -> SeqInputs:
        """``grid_thw``: one row per image or video in prompt order; ``visual_embeds``: their rows
        ([tokens, hidden * (1 + deepstack layers)]); ``second_per_grid_ts``: one per video (Qwen2.5-VL)."""
        info = self.info
        ids = torch.from_numpy(input_ids.astype(np.int64))[None]
        types = mm_token_types(input_ids, info)
        kinds = grid_kinds(types, grid_thw, info.merge_unit)
        grid = torch.from_numpy(grid_thw.astype(np.int64))
        rope = {"image_grid_thw": grid[kinds == 1] if (kinds == 1).any() else None,
                "video_grid_thw": grid[kinds == 2] if (kinds == 2).any() else None}
        if info.family == "qwen2_5_vl" and rope["video_grid_thw"] is not None:
            if len(second_per_grid_ts) != len(rope["video_grid_thw"]):
                raise InvalidArgument(f"{len(rope['video_grid_thw'])} videos with {len(second_per_grid_ts)} "
                                      "second_per_grid_ts values")
            rope["second_per_grid_ts"] = torch.tensor(list(second_per_grid_ts), dtype=torch.float32)
        with torch.inference_mode():
            positions, _ = self.model.model.get_rope_index(ids, torch.from_numpy(types)[None], **rope)
        embeds = deepstack = None
        if visual_embeds.shape[0]:
            rows = torch.from_numpy(visual_embeds).to(self.device, self.dtype)
            hidden = info.text_hidden
            embeds = rows[:, :hidden]
            if info.deepstack_layers:
                deepstack = rows[:, hidden:].reshape(rows.shape[0], info.deepstack_layers, hidden)
        visual = torch.from_numpy(np.flatnonzero(types)).long()
        # generated tokens continue from the LAST prompt position + 1, as generate() does (transformers 5
        # increments position_ids), not from the rope index's max + 1: they differ when a video's time
        # positions outrun the text after it (second_per_grid_t > 1)
        delta = int(positions[:, 0, -1].max()) + 1 - ids.shape[1]
        return SeqInputs(positions[:, 0].cpu(), delta, visual, embeds, deepstack)

    def use_attention(self, fn) -> None:
        """The hop to our attention: every decoder layer calls ``fn`` (registered with transformers under a
        name of its own, attention/registry.py; the backend's function, or the compiled step's wrapper of
        it), and run() hands it the step's StepMeta as ``tvl_meta``."""
        name = attn.register(fn)
        self.lm.config._attn_implementation = name
        for layer in self.lm.layers:
            layer.self_attn.config._attn_implementation = name

    # ---- per step ----
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor | None]:
        """Forward the step; return the ids of the sequences that sample and their logits [n, vocab]
        (a StepLogits: computed when the sampler asks, whole or as each row's argmax)."""
        step = self.pack(batch)
        if self.tp is not None:  # the other ranks run the same step on their shards
            self.tp.broadcast(("step", step.to_wire()))
            hidden = self.tp.guard("step", lambda: self.forward(step))
        else:
            hidden = self.forward(step)  # [T, hidden]
        if not step.sample_rows:
            return [], None
        return step.sample_ids, StepLogits(self, hidden[torch.tensor(step.sample_rows, device=self.device)])

    def pack(self, batch: ScheduledBatch) -> PackedStep:
        """The step's sequences as one packed row: their new tokens, mRoPE positions, attention spans,
        the visual embedding rows that land in it and the rows whose logits are sampled."""
        total = sum(entry.num_new_tokens for entry in batch)
        step = PackedStep(torch.empty(3, total, dtype=torch.long))
        decode_rows, decode_pos = [], []
        row = 0
        for entry in batch:
            seq, start, n = entry.seq, entry.start, entry.num_new_tokens
            inputs: SeqInputs = seq.payload.inputs
            step.tokens.extend(seq.token_ids[start:start + n])
            if start >= seq.num_prompt_tokens and n == 1:  # the common decode row: filled in one op below
                decode_rows.append(row)
                decode_pos.append(start + inputs.rope_delta)
            else:
                self._place_positions(step.positions, row, start, n, seq.num_prompt_tokens, inputs)
            step.parts.append(attn.SeqStep(row, start, n, seq.block_table))
            if inputs.visual_embeds is not None and start < seq.num_prompt_tokens:
                step.add_visual(inputs, row, start, start + n)
            if entry.sample:
                step.sample_rows.append(row + n - 1)
                step.sample_ids.append(seq.seq_id)
            row += n
        if decode_rows:
            step.positions[:, decode_rows] = torch.tensor(decode_pos)
        return step

    @staticmethod
    def _place_positions(positions: torch.Tensor, row: int, start: int, n: int, prompt_len: int,
                         inputs: SeqInputs) -> None:
        """Positions of a chunk: the rope index's inside the prompt, position + rope_delta after it."""
        end = start + n
        later = (torch.arange(start, end) + inputs.rope_delta).expand(3, n)
        if start < prompt_len:
            split = min(end, prompt_len) - start
            positions[:, row:row + split] = inputs.prompt_positions[:, start:start + split]
            positions[:, row + split:row + n] = later[:, split:]
        else:
            positions[:, row:row + n] = later

    def forward(self, step: PackedStep) -> torch.Tensor:
        """The decoder over the packed row: token embeddings with the visual rows scattered in (and
        Qwen3-VL's deepstack features), K/V written to the paged cache; the last hidden states [T, hidden]."""
        if self.compiled is not None:  # decode steps within its buckets; None: run eager below
            hidden = self.compiled.forward(step)
            if hidden is not None:
                return hidden
        dev = self.device
        meta = attn.build_meta(self.backend, self.kv_cache, self.block_size, step.parts, dev)
        x = self.lm.embed_tokens(torch.tensor(step.tokens, device=dev))
        deep = {}
        if step.visual_rows:
            rows = torch.cat(step.visual_rows).to(dev)
            x[rows] = torch.cat(step.visual_src).to(x.dtype)
            if step.deep_src:  # Qwen3-VL: added after decoder layer j to the step's visual rows (ascending order)
                mask = torch.zeros(1, x.shape[0], dtype=torch.bool, device=dev)
                mask[0, rows] = True
                feats = torch.cat(step.deep_src)  # [visual rows of the step, layers, hidden]
                deep = {"visual_pos_masks": mask,
                        "deepstack_visual_embeds": [feats[:, j] for j in range(feats.shape[1])]}
        pos = step.positions[:, None, :].to(dev)  # [3, 1, T]
        hidden = self.lm(inputs_embeds=x[None], position_ids=pos, attention_mask={"full_attention": None},
                         use_cache=False, tvl_meta=meta, **deep).last_hidden_state
        return hidden[0]


class StepLogits:
    """The logits of a step's sampled rows, computed on demand: ``full()`` [n, vocab] float (what
    penalties, logprobs, grammar masks and random sampling need), or ``argmax()`` (plain greedy rows
    only). Indexing and ``shape`` behave as the full tensor's."""

    def __init__(self, runner: ModelRunner, hidden: torch.Tensor) -> None:
        self._runner, self._hidden, self._full = runner, hidden, None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._hidden.shape[0], self._runner.head.vocab))

    @torch.inference_mode()
    def full(self) -> torch.Tensor:
        if self._full is None:
            self._full = self._runner.head.logits(self._hidden)
        return self._full

    @torch.inference_mode()
    def argmax(self) -> list[int]:
        """Every row's argmax (from the full logits when they were already made)."""
        if self._full is not None:
            return first_argmax(self._full).tolist()
        return self._runner.head.argmax(self._hidden)

    def rows(self, index: list[int]) -> StepLogits:
        """The same step's logits for rows ``index`` only (nothing computed yet)."""
        part = StepLogits(self._runner, self._hidden[index])
        if self._full is not None:
            part._full = self._full[index]
        return part

    def __getitem__(self, index):
        return self.full()[index]

    def __len__(self) -> int:
        return self._hidden.shape[0]
