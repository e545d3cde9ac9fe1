"""What every benchmark prints beside its figures: the CPU and the load average (figures from a busy
2-core machine mean little without them)."""

from __future__ import annotations

import os


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return "?"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
