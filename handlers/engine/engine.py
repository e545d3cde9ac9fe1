"""The engine thread: admit jobs, step (schedule -> run -> book), stream results, honour cancels."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tritonvl.handlers.engine.block_manager import BlockManager
from tritonvl.handlers.engine.config import EngineConfig
from tritonvl.handlers.engine.model_runner import ModelRunner, SeqInputs
from tritonvl.handlers.engine.scheduler import QueueFullError, Scheduler
from tritonvl.handlers.engine.sequence import Sequence
from tritonvl.handlers.errors import InvalidArgument, Unavailable
from tritonvl.handlers.llm.job import Job
from tritonvl.handlers.llm.sampler import SeqSampler
from tritonvl.handlers.llm.textstream import OutputStream
from tritonvl.handlers.metrics import NullSink, Snapshot
from tritonvl.handlers.modelinfo import ModelInfo

log = logging.getLogger("tritonvl.engine")


@dataclass
class SeqState:
    """Everything the engine keeps per sequence beyond the scheduler's view (``seq.payload``)."""

    job: Job
    inputs: SeqInputs
    stream: OutputStream
    sampler: SeqSampler
    arrived: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None


def image_spans(input_ids: np.ndarray, image_token_id: int, hashes: list[bytes]) -> list[tuple[int, int, bytes]]:
    """(start, length, content hash) of each run of image placeholders, in prompt order."""
    is_img = np.concatenate([[False], input_ids == image_token_id, [False]])
    edges = np.flatnonzero(np.diff(is_img.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) != len(hashes):
        raise InvalidArgument(f"{len(starts)} image placeholder runs for {len(hashes)} images")
    return [(int(s), int(e - s), h) for s, e, h in zip(starts, ends, hashes)]


class LLMEngine:
    def __init__(self, model_dir: str, info: ModelInfo, tokenizer, device: str, dtype, kv_cache_bytes: int,
                 block_size: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, max_waiting: int = 1024,
                 attention: str = "auto", metrics=None, deadline_s: float = 0.0,
                 kv_cache_fraction: float = 0.5) -> None:
        self.info, self.tokenizer, self.device = info, tokenizer, device
        self.runner = ModelRunner(model_dir, info, device, dtype, kv_cache_bytes, block_size, attention,
                                  kv_cache_fraction)
        block_size = self.runner.block_size
        capacity = self.runner.num_blocks * block_size
        max_len = min(max_model_len or info.max_position_embeddings, capacity)
        self.config = EngineConfig(num_blocks=self.runner.num_blocks, max_model_len=max_len, block_size=block_size,
                                   max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
                                   enable_prefix_caching=enable_prefix_caching, max_waiting=max_waiting)
        self.blocks = BlockManager.from_config(self.config)
        self.scheduler = Scheduler(self.config, self.blocks)
        self.metrics = metrics or NullSink()
        self.metrics.info("engine_info", "The llm engine's configuration (labels); value 1", self.describe())
        self.deadline_s = deadline_s  # 0 = none
        self.counters = {"prompt_tokens": 0, "computed_prompt_tokens": 0, "generation_tokens": 0,
                         "image_tokens": 0, "requests_finished": 0, "requests_rejected": 0}
        self._ttft: list[float] = []
        self._tpot: list[float] = []
        self._published = 0.0
        self._drain_until = 0.0
        self.intake: queue.Queue[Job | None] = queue.Queue()
        self._stop = threading.Event()
        self.healthy = True
        self.thread = threading.Thread(target=self._loop, name="tritonvl-engine", daemon=True)
        self.thread.start()

    def describe(self) -> dict:
        """What the engine runs with (logged at start, labels of tritonvl_engine_info)."""
        cfg = self.config
        return {"attention_backend": self.runner.backend.name, "device": self.device,
                "dtype": str(self.runner.dtype).removeprefix("torch."), "block_size": cfg.block_size,
                "num_blocks": cfg.num_blocks, "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                "max_num_batched_tokens": cfg.max_num_batched_tokens,
                "prefix_caching": str(cfg.enable_prefix_caching).lower()}

    # ---- called from Triton's threads ----
    def submit(self, job: Job) -> None:
        self.intake.put(job)

    def stop(self, drain_seconds: float = 20.0) -> None:
        """Finish what is in flight (up to ``drain_seconds``), then end the rest with an error.

        Triton calls this from finalize() after its own exit timeout; new requests have stopped coming.
        """
        self._drain_until = time.monotonic() + drain_seconds
        self._stop.set()
        self.intake.put(None)
        self.thread.join(timeout=drain_seconds + 10)

    # ---- the engine thread ----
    def _loop(self) -> None:
        while not self._stop.is_set() or (self.scheduler.has_work() and time.monotonic() < self._drain_until):
            try:
                busy = self.scheduler.has_work()
                self._admit(block=not busy)
                self._reap_cancelled()
                if self.scheduler.has_work():
                    self.step()
                self.publish(force=busy)
            except Exception as exc:  # a fault in a step: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(exc)
        self._admit(block=False)
        self._fail_all(Unavailable("the server is shutting down"))

    def publish(self, force: bool = False) -> None:
        """Hand the metrics sink a snapshot (every step while busy, twice a second when idle)."""
        now = time.monotonic()
        if not force and now - self._published < 0.5:
            return
        self._published = now
        blocks = self.blocks
        counters = {**self.counters, "prefix_cache_hit_tokens": blocks.prefix_hits_tokens,
                    "prefix_cache_query_tokens": blocks.prefix_queries_tokens,
                    "preemptions": self.scheduler.num_preemptions}
        gauges = {"num_requests_running": self.scheduler.num_running,
                  "num_requests_waiting": self.scheduler.num_waiting + self.intake.qsize(),
                  "kv_cache_usage_ratio": blocks.usage}
        observations = {"time_to_first_token_seconds": self._ttft, "time_per_output_token_seconds": self._tpot}
        self._ttft, self._tpot = [], []
        self.metrics.update(Snapshot(counters, gauges, observations))

    def _admit(self, block: bool) -> None:
        try:
            job = self.intake.get(timeout=0.05) if block else self.intake.get_nowait()
        except queue.Empty:
            return
        while job is not None:
            self._add(job)
            try:
                job = self.intake.get_nowait()
            except queue.Empty:
                return

    def _add(self, job: Job) -> None:
        try:
            if job.is_cancelled():
                job.responder.finish("cancelled")
                return
            n = int(job.input_ids.shape[0])
            if n >= self.config.max_model_len:
                raise InvalidArgument(f"prompt: {n} tokens does not fit max_model_len={self.config.max_model_len}")
            params = job.options.sampling
            params.max_tokens = min(params.max_tokens, self.config.max_model_len - n)
            spans = image_spans(job.input_ids, self.info.image_token_id, job.image_hashes)
            stream = OutputStream(self.tokenizer, params, self.info.eos_token_ids)
            state = SeqState(job, self.runner.prepare(job.input_ids, job.image_embeds, job.image_grid_thw), stream,
                             SeqSampler(params, job.input_ids.tolist(), stream.stop_ids, self.device))
            seq = Sequence(job.input_ids.tolist(), params.max_tokens, mm_hashes=spans, payload=state)
            self.scheduler.add(seq)
            self.counters["prompt_tokens"] += n
            self.counters["image_tokens"] += sum(s[1] for s in spans)
        except QueueFullError:
            self.counters["requests_rejected"] += 1
            job.responder.fail(Unavailable("server overloaded: the waiting queue is full, retry later"))
        except Exception as exc:
            self.counters["requests_rejected"] += 1
            job.responder.fail(exc if isinstance(exc, InvalidArgument) else InvalidArgument(str(exc)))

    def _reap_cancelled(self) -> None:
        """Cancelled requests and requests past their deadline leave at once, freeing their blocks."""
        now = time.monotonic()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            st: SeqState = seq.payload
            if st.job.is_cancelled():
                self.scheduler.abort(seq.seq_id)
                self.counters["requests_finished"] += 1
                st.job.responder.finish("cancelled")
            elif self.deadline_s and now - st.arrived > self.deadline_s:
                self.scheduler.abort(seq.seq_id)
                self.counters["requests_finished"] += 1
                st.job.responder.fail(Unavailable(
                    f"request exceeded the {self.deadline_s:g}-second deadline (llm parameter request_deadline_s)"))

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not len(batch):
            return
        self.counters["computed_prompt_tokens"] += sum(e.num_new_tokens for e in batch if not e.is_decode)
        ids, logits = self.runner.run(batch)
        sampled = self.sample(ids, logits)
        now = time.monotonic()
        for seq in self.scheduler.postprocess(batch, sampled):
            st: SeqState = seq.payload
            token = sampled[seq.seq_id]
            self.counters["generation_tokens"] += 1
            if st.first_token is None:
                st.first_token = now
                self._ttft.append(now - st.arrived)
            else:
                self._tpot.append(now - st.last_token)
            st.last_token = now
            text = st.stream.add(token)
            if st.stream.finished or seq.is_finished:
                if not seq.is_finished:
                    self.scheduler.finish(seq.seq_id)
                self.counters["requests_finished"] += 1
                st.job.responder.finish(st.stream.finish_reason or "length", text, [token])
            else:
                st.job.responder.delta(text, [token])

    def sample(self, ids: list[int], logits) -> dict[int, int]:
        """One argmax call for every plain-greedy sequence; the rest sample with their own params."""
        samplers = [self.scheduler.get(sid).payload.sampler for sid in ids]
        greedy = [i for i, s in enumerate(samplers) if s.plain_greedy]
        out: dict[int, int] = {}
        if greedy:
            for i, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                samplers[i].record(token)
                out[ids[i]] = token
        for i, s in enumerate(samplers):
            if ids[i] in out:
                continue
            try:
                out[ids[i]] = s(logits[i])
            except Exception as exc:  # this sequence's parameters broke sampling: fail it alone
                log.exception("sampling failed for sequence %d", ids[i])
                seq = self.scheduler.abort(ids[i])
                if seq is not None:
                    seq.payload.job.responder.fail(exc)
        return out

    def _fail_all(self, exc: Exception) -> None:
        while True:  # jobs not admitted yet
            try:
                job = self.intake.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.responder.fail(exc)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.abort(seq.seq_id)
            seq.payload.job.responder.fail(exc)
