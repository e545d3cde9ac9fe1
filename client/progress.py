"""A small progress bar on stderr: count, rate and ETA (no dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``update(n)`` after each item. Redraws in place on a terminal; elsewhere (logs, pipes) prints a
    line at most every ``interval`` seconds, and always the last one."""

    def __init__(self, total: int, label: str = "", unit: str = "img", stream: TextIO | None = None,
                 interval: float = 10.0, width: int = 24) -> None:
        self.total, self.label, self.unit, self.width = total, label, unit, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.1
        self.done = 0
        self.errors = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1, error: bool = False) -> None:
        self.done += n
        self.errors += int(error)
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        filled = int(self.width * self.done / self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        errors = f" {self.errors} err" if self.errors else ""
        return (f"{self.label}[{bar}] {self.done}/{self.total}{errors} {rate:.2f} {self.unit}/s "
                f"elapsed {_clock(elapsed)} ETA {_clock(eta) if eta is not None else '--:--'}")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        self.stream.write(("\r" + self.line(now) + "\x1b[K") if self.tty else self.line(now) + "\n")
        self.stream.flush()
