"""Compiled grammars: one compile per distinct spec, off the engine thread, bounded in bytes.

xgrammar releases the GIL while it compiles, so worker threads compile beside the engine thread
without slowing its steps beyond the CPU they take. A compile cannot be interrupted: when one runs
past the time limit the waiting request fails with INVALID_ARG, the compile is *abandoned* (it
finishes in the background and its result is still cached), and a fresh worker takes its place so
the queue keeps moving. At most ``max_abandoned`` abandoned compiles run at once; past that, new
compiles wait for a worker (and their requests time out in turn), which bounds the CPU a flood of
pathological patterns can take.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.client.rules.structured import GrammarSpec
from tritonvl.handlers.engine.grammar.xgr import to_grammar, xgrammar_message

log = logging.getLogger("tritonvl.grammar")


@dataclass
class GrammarStats:
    """Cumulative counters plus compile times observed since the last ``drain_times``."""

    hits: int = 0
    misses: int = 0
    timeouts: int = 0
    errors: int = 0
    evictions: int = 0
    compile_times: list[float] = field(default_factory=list)

    def counters(self) -> dict[str, int]:
        return {"grammar_cache_hits": self.hits, "grammar_cache_misses": self.misses,
                "grammar_compile_timeouts": self.timeouts, "grammar_compile_errors": self.errors}

    def drain_times(self) -> list[float]:
        n = len(self.compile_times)  # workers append concurrently: take a prefix, keep the rest
        out = self.compile_times[:n]
        del self.compile_times[:n]
        return out


@dataclass(eq=False)
class Entry:
    """One spec's compile: queued, running (``started``), or done (``future``)."""

    spec: GrammarSpec
    future: Future = field(default_factory=Future)
    started: float | None = None
    abandoned: bool = False
    nbytes: int = 0


class GrammarCache:
    """Spec -> compiled grammar for one tokenizer; LRU over finished entries, ``max_bytes`` in all."""

    def __init__(self, tokenizer, vocab_size: int, max_bytes: int = 512 << 20, workers: int = 2,
                 max_abandoned: int = 4, compile_threads: int = 1) -> None:
        self.vocab_size = vocab_size
        # xgrammar's import and the tokenizer's table take seconds: built in the background, so neither
        # the model's load nor the engine thread waits for them (the first compile does)
        self._setup: Future = Future()
        threading.Thread(target=self._build, args=(tokenizer, compile_threads), name="tritonvl-grammar-setup",
                         daemon=True).start()
        self.max_bytes, self.workers, self.max_abandoned = max_bytes, workers, max_abandoned
        self.stats = GrammarStats()
        self._entries: OrderedDict[GrammarSpec, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[Entry | None] = queue.Queue()
        self._live = 0  # worker threads alive
        self._abandoned_running = 0
        for _ in range(workers):
            self._spawn()

    def _build(self, tokenizer, compile_threads: int) -> None:
        try:
            import xgrammar as xgr

            # vocab_size is the logits' width (the model's padded vocabulary), not len(tokenizer)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
            self._setup.set_result(xgr.GrammarCompiler(info, max_threads=compile_threads, cache_enabled=False))
        except Exception as exc:  # every compile then fails with this reason
            log.exception("structured outputs unavailable")
            self._setup.set_exception(exc)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until xgrammar and the tokenizer's table are loaded (tests, benchmarks)."""
        self._setup.result(timeout)

    def get(self, spec: GrammarSpec) -> Entry:
        """The entry for ``spec``: cached (a hit), being compiled, or queued now (a miss)."""
        with self._lock:
            entry = self._entries.get(spec)
            if entry is not None:
                self._entries.move_to_end(spec)
                self.stats.hits += 1
                return entry
            self.stats.misses += 1
            entry = self._entries[spec] = Entry(spec)
        self._queue.put(entry)
        return entry

    def abandon(self, entry: Entry) -> None:
        """A request gave up on a running compile: let a new worker take the queue over."""
        with self._lock:
            if entry.started is None or entry.abandoned or entry.future.done():
                return
            entry.abandoned = True
            self._abandoned_running += 1
            spawn = self._abandoned_running <= self.max_abandoned
        log.warning("grammar compile abandoned after %.1f s (%s, %d characters)",
                    time.monotonic() - entry.started, entry.spec.kind, len(entry.spec.text))
        if spawn:
            self._spawn()

    def close(self) -> None:
        for _ in range(self._live):
            self._queue.put(None)

    def __len__(self) -> int:
        return len(self._entries)

    # ---- worker threads ----
    def _spawn(self) -> None:
        with self._lock:
            self._live += 1
        threading.Thread(target=self._work, name="tritonvl-grammar", daemon=True).start()

    def _work(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                break
            try:
                compiler = self._setup.result()
                entry.started = time.monotonic()
                compiled = self._compile(compiler, entry.spec)
            except Exception as exc:
                with self._lock:
                    self.stats.errors += 1
                    self._entries.pop(entry.spec, None)  # a failed spec is not kept: it may be retried
                entry.future.set_exception(exc)
            else:
                seconds = time.monotonic() - entry.started
                with self._lock:
                    self.stats.compile_times.append(seconds)
                    entry.nbytes = int(compiled.memory_size_bytes)
                    if self._entries.get(entry.spec) is entry:
                        self._bytes += entry.nbytes
                        self._evict()
                entry.future.set_result(compiled)
            with self._lock:
                if entry.abandoned:
                    self._abandoned_running -= 1
                    if self._live - self._abandoned_running > self.workers:
                        break  # a replacement took this worker's place
        with self._lock:
            self._live -= 1

    def _compile(self, compiler, spec: GrammarSpec):
        grammar = to_grammar(spec)
        try:
            return compiler.compile_grammar(grammar)
        except Exception as exc:
            raise InvalidArgument(f"structured output: cannot compile the {spec.kind}: {xgrammar_message(exc)}") \
                from None

    def _evict(self) -> None:
        """Drop least recently used finished entries until the bytes fit (the newest always stays)."""
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            victim = next((e for e in self._entries.values() if e.future.done()), None)
            if victim is None:
                return
            del self._entries[victim.spec]
            self._bytes -= victim.nbytes
            self.stats.evictions += 1


class CompileWaitlist:
    """Requests waiting for their grammar, polled by the engine thread (which never blocks on a compile)."""

    def __init__(self, cache: GrammarCache, timeout_s: float) -> None:
        self.cache, self.timeout_s = cache, timeout_s
        self._items: list[tuple[object, Entry, float]] = []

    def add(self, item, spec: GrammarSpec) -> None:
        self._items.append((item, self.cache.get(spec), time.monotonic()))

    def __len__(self) -> int:
        return len(self._items)

    def take_all(self) -> list:
        """Every waiting item, removed (shutdown)."""
        items, self._items = [item for item, _, _ in self._items], []
        return items

    def _late(self, entry: Entry, since: float, now: float) -> bool:
        """Past the limit since the later of the request's arrival and its compile's start (xgrammar's
        one-off set-up and a queue behind other compiles do not count, up to 10x the limit)."""
        if entry.started is None:
            return now - since > 10 * self.timeout_s
        return now - max(since, entry.started) > self.timeout_s

    def poll(self) -> tuple[list[tuple[object, object]], list[tuple[object, Exception]]]:
        """(item, compiled) pairs ready now, and (item, error) pairs that failed or ran out of time."""
        ready, failed, keep = [], [], []
        now = time.monotonic()
        for item, entry, since in self._items:
            if entry.future.done():
                exc = entry.future.exception()
                (failed if exc else ready).append((item, exc or entry.future.result()))
            elif self._late(entry, since, now):
                self.cache.stats.timeouts += 1
                self.cache.abandon(entry)
                failed.append((item, InvalidArgument(
                    f"structured output: compiling the {entry.spec.kind} took longer than {self.timeout_s:g} s "
                    "(llm parameter grammar_compile_timeout_s); simplify it (e.g. smaller maxLength/maxItems)")))
            else:
                keep.append((item, entry, since))
        self._items = keep
        return ready, failed
