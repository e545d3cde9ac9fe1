"""Fail fast when a sibling Python-backend stub dies.

Since Triton 24.06 a crashed stub is not restarted, the server keeps reporting ready, and the
streams that stub was serving never end (seen with 2.51). Every model instance of this repository
registers its stub's pid; each one checks the others once a second. When one has died without
unregistering (a clean unload unregisters in finalize), the watchdog stops the server (SIGTERM, then
SIGKILL after a grace period): readiness goes false at once, open streams end with a connection
error, and the orchestrator restarts the server.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("tritonvl.watchdog")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not reaped by the server yet) is dead too
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return True


class Watchdog:
    def __init__(self, name: str, server_pid: int | None = None, interval: float = 1.0,
                 grace_seconds: float = 40.0) -> None:
        self.server_pid = server_pid or os.getppid()
        self.dir = Path(tempfile.gettempdir()) / f"tritonvl-stubs-{self.server_pid}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"{name}.{os.getpid()}"
        self.file.write_text(str(os.getpid()))
        self.interval, self.grace = interval, grace_seconds
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tritonvl-watchdog", daemon=True)
        self.thread.start()

    def dead_siblings(self) -> list[str]:
        dead = []
        for f in self.dir.iterdir():
            try:
                pid = int(f.name.rsplit(".", 1)[1])
            except (IndexError, ValueError):
                continue
            if f.exists() and not _alive(pid):
                dead.append(f.name)
        return dead

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            dead = self.dead_siblings()
            if dead and not self._stop.is_set():
                log.error("stub(s) %s died: stopping the server (pid %d) so it can be restarted",
                          dead, self.server_pid)
                self._stop_server()
                return

    def _stop_server(self) -> None:
        try:
            os.kill(self.server_pid, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while time.monotonic() < deadline and _alive(self.server_pid):
                time.sleep(0.5)
            if _alive(self.server_pid):
                os.kill(self.server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """A clean unload: unregister first, so siblings do not take it for a crash."""
        self._stop.set()
        self.file.unlink(missing_ok=True)
