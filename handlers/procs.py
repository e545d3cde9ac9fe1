"""Stopping a child process the same way everywhere (servers, gateways): SIGTERM, then SIGKILL."""

from __future__ import annotations

import subprocess


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
