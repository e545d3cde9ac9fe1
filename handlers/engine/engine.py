"""The engine thread: admit jobs, step (schedule -> run -> sample -> postprocess), honour cancels."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tritonvl.client.rules.errors import (
    DeadlineExceeded,
    Overloaded,
    RequestError,
    Unavailable,
)
from tritonvl.client.rules.structured import GrammarSpec
from tritonvl.handlers.devices import start_compute_thread, tp_devices
from tritonvl.handlers.engine.block_manager import BlockManager
from tritonvl.handlers.engine.config import EngineConfig
from tritonvl.handlers.engine.grammar.compiler import CompileWaitlist, GrammarCache
from tritonvl.handlers.engine.grammar.matcher import GrammarMasker, SeqGrammar
from tritonvl.handlers.engine.job import Job
from tritonvl.handlers.engine.logprobs import entries as logprob_entries
from tritonvl.handlers.engine.model_runner import ModelRunner, SeqInputs
from tritonvl.handlers.engine.sampler import SeqSampler, sample_batch
from tritonvl.handlers.engine.scheduler import QueueFullError, Scheduler
from tritonvl.handlers.engine.sequence import Sequence, stop_ids_for
from tritonvl.handlers.engine.stats import EngineStats, SeqTimes
from tritonvl.handlers.engine.textstream import OutputStream
from tritonvl.handlers.engine.visual import content_keys, image_spans, timed_spans
from tritonvl.handlers.metrics import NullSink
from tritonvl.handlers.modelinfo import ModelInfo
from tritonvl.handlers.options import fit_to_context
from tritonvl.handlers.params import LLMParams

log = logging.getLogger("tritonvl.engine")


@dataclass
class SeqState:
    """Everything the engine keeps per sequence beyond the scheduler's view (``seq.payload``)."""

    job: Job
    inputs: SeqInputs
    stream: OutputStream
    sampler: SeqSampler
    times: SeqTimes = field(default_factory=SeqTimes)


@dataclass
class _Call:
    """A function for the engine thread to run between steps (LLMEngine.call)."""

    fn: Callable
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the caller
            self.error = exc
        finally:
            self.done.set()


class LLMEngine:
    def __init__(self, model_dir: str, info: ModelInfo, tokenizer, device: str, dtype, params: LLMParams,
                 metrics=None, devices: tuple[str, ...] = ()) -> None:
        """``params``: the llm model's typed parameters (handlers/params.py), taken whole. ``devices``:
        one per tensor-parallel rank (``device`` first) when ``tensor_parallel_size`` > 1."""
        p = params
        self.info, self.tokenizer, self.device = info, tokenizer, device
        self.intake: queue.Queue = queue.Queue()  # Jobs, _Calls, None (stop)
        self._stop = threading.Event()
        self.healthy = True
        # The engine thread loads the model, compiles and runs every step: all of the engine's torch work
        # on one thread (devices.start_compute_thread says why).
        self.thread = start_compute_thread("tritonvl-engine", device,
                                           lambda: self._load(model_dir, dtype, p, metrics, devices), self._loop)

    def _load(self, model_dir, dtype, p: LLMParams, metrics, devices) -> None:
        info, device = self.info, self.device
        self.runner = ModelRunner(model_dir, info, device, dtype, p.kv_cache_bytes or 0, p.block_size,
                                  p.attention_backend, p.kv_cache_fraction, quantization=p.quantization,
                                  cpu_linear=p.cpu_linear, cpu_linear_fuse=p.compile == "none",
                                  greedy_screen=p.cpu_greedy_screen,
                                  tp_devices=tuple(devices or tp_devices(device, p.tensor_parallel_size))
                                  if p.tensor_parallel_size > 1 else ())
        block_size = self.runner.block_size
        capacity = self.runner.num_blocks * block_size
        self.declared_max_len = p.max_model_len or info.max_position_embeddings  # before the KV cache's cap
        self.config = EngineConfig(num_blocks=self.runner.num_blocks, max_model_len=min(self.declared_max_len, capacity),
                                   block_size=block_size, max_num_seqs=p.max_num_seqs,
                                   max_num_batched_tokens=max(p.max_num_batched_tokens, p.max_num_seqs),
                                   enable_prefix_caching=p.enable_prefix_caching, max_waiting=p.max_waiting)
        self.blocks = BlockManager.from_config(self.config)
        if p.compile != "none":  # handlers/engine/compiled.py: compiled (and captured) at load
            from .compiled import build as build_compiled
            self.runner.compiled = build_compiled(self.runner, p.compile, p.compile_buckets, p.max_num_seqs,
                                                  self.config.max_model_len)
        self.scheduler = Scheduler(self.config, self.blocks)
        self.metrics = metrics or NullSink()
        self.metrics.info("engine_info", "The llm engine's configuration (labels); value 1", self.describe())
        self.deadline_s = p.request_deadline_s  # 0 = none
        self.stream_interval = p.stream_interval
        self.stats = EngineStats(self.metrics, self.scheduler, self.blocks)
        # structured outputs, set up on the first constrained request (xgrammar loads in the background)
        self._grammar_limits = (p.grammar_compile_timeout_s, p.grammar_cache_bytes)
        self._grammar_wait: CompileWaitlist | None = None
        self._masker: GrammarMasker | None = None
        self._drain_until = 0.0
        self._drain_at = 0.0  # begin_drain(): when what is in flight is cut off

    def describe(self) -> dict:
        """What the engine runs with (logged at start, labels of tritonvl_engine_info)."""
        cfg = self.config
        return {"attention_backend": self.runner.backend.name, "device": self.device,
                "dtype": str(self.runner.dtype).removeprefix("torch."), "block_size": cfg.block_size,
                "num_blocks": cfg.num_blocks, "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                "max_num_batched_tokens": cfg.max_num_batched_tokens,
                "prefix_caching": str(cfg.enable_prefix_caching).lower(), **self.runner.weights,
                **({"tensor_parallel_size": self.runner.tp.size} if self.runner.tp else {})}

    # ---- called from Triton's threads ----
    def submit(self, job: Job) -> None:
        self.intake.put(job)

    def call(self, fn: Callable) -> Any:
        """``fn()`` run on the engine thread between two steps; its result (or its exception, raised
        here). For torch work that would otherwise run on another thread of this process (the
        in-process pipeline's vision tower): see __init__ on why the engine's process keeps it on one."""
        c = _Call(fn)
        self.intake.put(c)
        while not c.done.wait(0.1):
            if not self.thread.is_alive():
                raise Unavailable("the engine thread has stopped")
        if c.error is not None:
            raise c.error
        return c.result

    def begin_drain(self, seconds: float) -> None:
        """The server is stopping: refuse new jobs; those in flight run up to ``seconds`` more, then
        end with finish_reason ``cancelled`` (a final response, before Triton's exit timeout)."""
        if not self._drain_at:
            self._drain_at = time.monotonic() + seconds

    def end_drain(self) -> None:
        """A drain begun by mistake (the server answers again): take new jobs again; those in flight
        are no longer cut off at the drain deadline."""
        self._drain_at = 0.0

    def stop(self, drain_seconds: float = 20.0) -> None:
        """Finish what is in flight (up to ``drain_seconds``), then end the rest with an error.

        Triton calls this from finalize() after its own exit timeout; new requests have stopped coming.
        """
        self._drain_until = time.monotonic() + drain_seconds
        self._stop.set()
        self.intake.put(None)
        self.thread.join(timeout=drain_seconds + 10)
        self.runner.close()  # tensor-parallel workers stop (parallel.py)

    # ---- the engine thread ----
    def _loop(self) -> None:
        while not self._stop.is_set() or (self.scheduler.has_work() and time.monotonic() < self._drain_until):
            try:
                busy = self.scheduler.has_work()
                self._admit(block=not busy, timeout=0.005 if self._grammar_wait else 0.05)
                self._admit_compiled()
                self._reap_cancelled()
                if self.scheduler.has_work():
                    self.step()
                else:
                    self.runner.keepalive()  # tensor-parallel workers hear from rank 0 while idle
                self.stats.publish(self.intake.qsize() + len(self._grammar_wait or ()), force=busy)
            except Exception as exc:  # a fault in a step: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(exc)
        self._admit(block=False)
        self._fail_all(Unavailable("the server is shutting down"))

    def _admit(self, block: bool, timeout: float = 0.05) -> None:
        try:
            job = self.intake.get(timeout=timeout) if block else self.intake.get_nowait()
        except queue.Empty:
            return
        while job is not None:
            if isinstance(job, _Call):
                job.run()
            else:
                self._add(job)
            try:
                job = self.intake.get_nowait()
            except queue.Empty:
                return

    def _add(self, job: Job, compiled=None) -> None:
        """Admit a job; one with a structured output first waits (off this thread) for its grammar."""
        try:
            if job.is_cancelled():
                job.responder.finish("cancelled")
                return
            if self._drain_at:
                raise Unavailable("the server is shutting down")
            if self.runner.broken:  # a tensor-parallel rank failed: no step can run any more
                raise Unavailable(self.runner.broken)
            job.check(self.info)
            job.responder.stream_interval = self.stream_interval
            n = int(job.input_ids.shape[0])
            params = job.options.sampling
            # more than the llm's max_model_len allows is refused (unless the request may be cut); a KV cache
            # too small for max_model_len cuts answers at its capacity (engine_info shows the effective one)
            fit_to_context(n, params, self.declared_max_len, job.options.clamp_max_tokens)
            fit_to_context(n, params, self.config.max_model_len, may_cut=True)
            if params.structured_outputs and compiled is None:
                self._grammars().add(job, GrammarSpec.from_dict(params.structured_outputs))
                return
            seq = self._sequence(job, compiled)
            self.scheduler.add(seq)
            self.stats.count("prompt_tokens", n)
            self.stats.count("image_tokens", sum(span[1] for span in seq.mm_hashes))
        except QueueFullError:
            self.stats.count("requests_rejected")
            job.responder.fail(Overloaded("server overloaded: the waiting queue is full, retry later"))
        except RequestError as exc:  # the request's fault (InvalidArgument, ...): its own code
            self.stats.count("requests_rejected")
            job.responder.fail(exc)
        except Exception as exc:  # ours (e.g. out of device memory in prepare): INTERNAL, with the reason
            log.exception("admitting a request failed")
            self.stats.count("requests_rejected")
            job.responder.fail(exc)

    def _sequence(self, job: Job, compiled) -> Sequence:
        """The scheduler's sequence of a job: its prompt, stop ids and visual spans (keyed by content for
        the prefix cache); the engine's own per-sequence state rides along as its payload."""
        params = job.options.sampling
        keys = content_keys(job.visual_embeds, job.grid_thw, self.info.merge_unit)  # never the caller's hashes
        spans = timed_spans(image_spans(job.input_ids, (self.info.image_token_id, self.info.video_token_id),
                                        keys, job.grid_thw, self.info.merge_unit),
                            job.input_ids, self.info, job.options.second_per_grid_ts)
        stop_ids = stop_ids_for(params.stop_token_ids, params.ignore_eos, self.info.eos_token_ids)
        # the grammar's end tokens: the request's stop ids (the model's eos when ignore_eos clears them)
        grammar = None if compiled is None else SeqGrammar(compiled, stop_ids or self.info.eos_token_ids)
        inputs = self.runner.prepare(job.input_ids, job.visual_embeds, job.grid_thw, job.options.second_per_grid_ts)
        sampler = SeqSampler(params, job.input_ids.tolist(), stop_ids, self.device, grammar, job.options.logprobs)
        state = SeqState(job, inputs, OutputStream(self.tokenizer, params), sampler)
        return Sequence(job.input_ids.tolist(), params.max_tokens, mm_hashes=spans, payload=state,
                        stop_ids=stop_ids, min_tokens=params.min_tokens)

    def _grammars(self) -> CompileWaitlist:
        if self._grammar_wait is None:
            timeout_s, cache_bytes = self._grammar_limits
            cache = GrammarCache(self.tokenizer, self.info.vocab_size, max_bytes=cache_bytes)
            self._grammar_wait = CompileWaitlist(cache, timeout_s)
            self._masker = GrammarMasker(self.info.vocab_size)
            self.stats.grammar = cache.stats
        return self._grammar_wait

    def _admit_compiled(self) -> None:
        """Jobs whose grammar compiled join the scheduler; a bad or too slow grammar fails its job."""
        if not self._grammar_wait:
            return
        ready, failed = self._grammar_wait.poll()
        for job, compiled in ready:
            self._add(job, compiled)
        for job, exc in failed:
            self.stats.count("requests_rejected")
            job.responder.fail(exc)

    def _reap_cancelled(self) -> None:
        """Cancelled requests, requests past their deadline and, past the drain deadline, every
        request leave at once, freeing their blocks."""
        now = time.monotonic()
        drained = bool(self._drain_at) and now >= self._drain_at
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            st: SeqState = seq.payload
            if drained or st.job.is_cancelled():
                self.scheduler.abort(seq.seq_id)
                self.stats.count("requests_finished")
                st.job.responder.finish("cancelled")
            elif self.deadline_s and now - st.times.arrived > self.deadline_s:
                self.scheduler.abort(seq.seq_id)
                self.stats.count("requests_finished")
                st.job.responder.fail(DeadlineExceeded(
                    f"request exceeded the {self.deadline_s:g}-second deadline (llm parameter request_deadline_s)"))

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not len(batch):
            return
        self.stats.scheduled(batch)
        ids, logits = self.runner.run(batch)
        sampled = self.sample(ids, logits)
        self.postprocess(self.scheduler.postprocess(batch, sampled), sampled)

    def sample(self, ids: list[int], logits) -> dict[int, int]:
        """The next token of each sequence that samples; one whose sampling failed is failed alone."""
        tokens: dict[int, int] = {}
        samplers = [self.scheduler.get(sid).payload.sampler for sid in ids]
        for sid, token in zip(ids, sample_batch(samplers, logits, self._masker)):
            if not isinstance(token, Exception):
                tokens[sid] = token
                continue
            log.error("sampling failed for sequence %d", sid, exc_info=token)
            seq = self.scheduler.abort(sid)
            if seq is not None:
                seq.payload.job.responder.fail(token)
        return tokens

    def postprocess(self, seqs: list[Sequence], sampled: dict[int, int]) -> None:
        """Detokenise each booked token and respond: a delta, or the last response when it ends. A fault
        while booking one sequence (its stop strings, logprobs, grammar) fails that sequence alone."""
        now = time.monotonic()
        for seq in seqs:
            try:
                self._book(seq, sampled[seq.seq_id], now)
            except Exception as exc:
                log.exception("booking a token failed for sequence %d", seq.seq_id)
                self.scheduler.abort(seq.seq_id)
                seq.payload.job.responder.fail(exc)

    def _book(self, seq: Sequence, token: int, now: float) -> None:
        st: SeqState = seq.payload
        self.stats.token(st.times, now)
        text = st.stream.add(token, seq.finish_reason)  # the scheduler's verdict (stop id, length)
        booked, st.sampler.booked_logprobs = st.sampler.booked_logprobs, []
        logprobs = logprob_entries(self.tokenizer, booked) if booked else ()
        grammar = st.sampler.grammar
        if grammar is not None and grammar.terminated and not st.stream.finished:
            text += st.stream.end("stop")  # the grammar ended it (before min_tokens, or with ignore_eos)
        if st.stream.finished or seq.is_finished:
            if not seq.is_finished:
                self.scheduler.finish(seq.seq_id)
            self.stats.count("requests_finished")
            st.job.responder.finish(st.stream.finish_reason or "length", text, [token], logprobs)
        else:
            st.job.responder.delta(text, [token], logprobs)

    def _fail_all(self, exc: Exception) -> None:
        for job in self._grammar_wait.take_all() if self._grammar_wait else []:  # still compiling
            job.responder.fail(exc)
        while True:  # jobs not admitted yet
            try:
                job = self.intake.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Call):
                job.error = exc
                job.done.set()
            elif job is not None:
                job.responder.fail(exc)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.abort(seq.seq_id)
            seq.payload.job.responder.fail(exc)
