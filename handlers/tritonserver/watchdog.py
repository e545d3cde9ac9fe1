"""One thread per stub that watches the server around it.

- Sibling crash. Since Triton 24.06 a crashed stub is not restarted, the server keeps reporting
  ready, and the streams that stub was serving never end (seen with 2.51). Every model instance
  registers its stub's pid; each one checks the others once a second. When one has died without
  unregistering (a clean unload unregisters in finalize), the watchdog stops the server (SIGTERM,
  then SIGKILL after a grace period) so the orchestrator restarts it.
- Server gone. A stub whose tritonserver was killed (SIGKILL, crash) is re-parented; it would keep
  its model (and device memory) forever. It exits on its own within one interval. A thread cannot
  do that while another holds the GIL in a call to the dead server (seen: an llm stub stuck for hours
  in a pb_utils metric update), so a tiny shell process (``MONITOR``, the stub's child) backs it up:
  it SIGKILLs the stub a few seconds after the server is gone, and ends by itself with the stub.
- Server stopping. On SIGTERM/SIGINT tritonserver 2.51 closes its HTTP port at once and only
  unloads models after every in-flight request ended, so finalize() comes too late to drain. The
  watchdog polls the server's own ``/v2/health/ready`` and calls ``on_shutdown`` once when it stops
  answering 200 after having answered it, or after the model got a request (``serving()``);
  docs/CANCELLATION.md.

Registrations live in ``$TMPDIR/tritonvl-stubs-<server pid>-<server start time>``: the start time
(``/proc/<pid>/stat`` field 22) tells a new server that reuses a pid from the dead one whose
registrations are still there. Sibling files are ``<name>.<pid>.<start time>`` for the same reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tritonvl.watchdog")

PREFIX = "tritonvl-stubs-"

# $1 server pid, $2 stub pid (this monitor's parent). Builtins and `sleep` only: it must not need the
# stub's Python. It kills nothing but its own parent (re-parented means the stub is gone: it exits),
# and tells a dead server from one whose pid was reused by the start time (/proc stat field 22).
MONITOR = """
s=$1; p=$2
read -r line < /proc/$s/stat || exit 0
set -- $line; start=${22}
alive() { read -r now < /proc/$s/stat 2>/dev/null || return 1; set -- $now; [ "${22}" = "$start" ]; }
parent() { read -r me < /proc/$$/stat || return 1; set -- $me; [ "$4" = "$p" ]; }
while parent; do
  if ! alive; then
    sleep 3  # the stub's own watchdog exits cleanly within a second when it can
    parent && kill -9 $p
    exit 0
  fi
  sleep 1
done
"""


def start_time(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (None: no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None = None) -> bool:
    """Running (not a zombie) and, when ``started`` is given, the same process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return started is None  # no /proc: trust kill(0)
    if fields[0] in ("Z", "X"):  # dead, not reaped by the server yet
        return False
    return started is None or fields[19] == started


def registry_dir(server_pid: int, root: Path | None = None) -> Path:
    return (root or Path(tempfile.gettempdir())) / f"{PREFIX}{server_pid}-{start_time(server_pid)}"


def remove_stale(root: Path | None = None) -> None:
    """Delete registries of servers that are gone (and of the old pid-only naming)."""
    for d in (root or Path(tempfile.gettempdir())).glob(PREFIX + "*"):
        pid, _, started = d.name[len(PREFIX):].partition("-")
        if not (pid.isdigit() and started and _alive(int(pid), started)):
            shutil.rmtree(d, ignore_errors=True)


def http_ready_url(server_pid: int) -> str | None:
    """The server's ready URL from its command line (None when HTTP is off)."""
    try:
        args = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    opts: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            opts[key] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    if opts.get("allow-http", "true").lower() in ("false", "0"):
        return None
    return f"http://127.0.0.1:{opts.get('http-port', '8000')}/v2/health/ready"


def _ready(url: str, timeout: float = 2.0) -> bool | None:
    """True: ready. False: a definite no (connection refused, or an answer other than 200, as when
    tritonserver 2.51 closes its HTTP port on SIGTERM). None: no answer in time, which on a loaded
    machine says nothing about shutdown and must never start a drain."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            return None
        return False if isinstance(exc.reason, ConnectionError) else None
    except (TimeoutError, socket.timeout):
        return None
    except ConnectionError:  # reset or refused mid-answer
        return False
    except Exception:
        return None


def start_monitor(server_pid: int):
    """The shell backstop of the orphan check (``MONITOR``); None where it cannot start."""
    import subprocess

    if not Path(f"/proc/{server_pid}/stat").exists():
        return None
    try:
        return subprocess.Popen(["sh", "-c", MONITOR, "tritonvl-stub-monitor", str(server_pid), str(os.getpid())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True)
    except OSError:
        log.warning("could not start the stub monitor", exc_info=True)
        return None


class Watchdog:
    def __init__(self, name: str, server_pid: int | None = None, interval: float = 1.0,
                 grace_seconds: float = 40.0, check_siblings: bool = True,
                 on_shutdown: Callable[[], None] | None = None, exit_when_orphaned: bool = True) -> None:
        self.parent = os.getppid()
        self.server_pid = server_pid or self.parent
        remove_stale()
        self.dir = registry_dir(self.server_pid)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"{name}.{os.getpid()}.{start_time(os.getpid())}"
        self.file.write_text(str(os.getpid()))
        self.interval, self.grace = interval, grace_seconds
        self.check_siblings, self.exit_when_orphaned = check_siblings, exit_when_orphaned
        self.on_shutdown: list[Callable[[], None]] = [on_shutdown] if on_shutdown else []
        self.ready_url = http_ready_url(self.server_pid)
        self._seen_ready = False
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tritonvl-watchdog", daemon=True)
        self.thread.start()
        # only in a stub (the server is its parent): the monitor kills its parent when the server dies
        self.monitor = start_monitor(self.server_pid) if exit_when_orphaned and self.server_pid == self.parent else None

    def serving(self) -> None:
        """The model got a request, so the server is up (its ready probe may not have run yet: a
        SIGTERM right after start must still be seen)."""
        self._seen_ready = True

    def dead_siblings(self) -> list[str]:
        dead = []
        for f in (self.dir.iterdir() if self.dir.is_dir() else ()):
            parts = f.name.rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            if f.exists() and not _alive(int(parts[1]), parts[2]):
                dead.append(f.name)
        return dead

    def _run(self) -> None:
        stopping = False
        while True:
            if self._stop.is_set():  # unloaded: only the orphan check goes on, as long as the process
                time.sleep(self.interval)  # lives (a finalize() talking to a dead server may never return)
            else:
                self._stop.wait(self.interval)
            if self.exit_when_orphaned and os.getppid() != self.parent:
                log.error("tritonserver (pid %d) is gone: this stub exits", self.server_pid)
                self.file.unlink(missing_ok=True)
                os._exit(1)
            if self._stop.is_set():
                continue
            try:
                if self.on_shutdown and not stopping and self.ready_url:
                    stopping = self._server_stopping()
                if self.check_siblings and not stopping:
                    dead = self.dead_siblings()
                    if dead and not self._stop.is_set():
                        log.error("stub(s) %s died: stopping the server (pid %d) so it can be restarted",
                                  dead, self.server_pid)
                        # in its own thread: this loop must go on noticing the shutdown (the drain)
                        threading.Thread(target=self._stop_server, name="tritonvl-stop-server", daemon=True).start()
                        self.check_siblings = False
            except Exception:  # this thread must live on: it is what ends an orphaned stub
                log.exception("watchdog check failed")

    def _server_stopping(self) -> bool:
        """True (after calling on_shutdown) once the server stops being ready after it was."""
        first = _ready(self.ready_url)
        if first:
            self._seen_ready = True
        # Still starting, no answer in time (a busy machine), or a one-off miss: not a shutdown.
        if first is not False or not self._seen_ready or _ready(self.ready_url) is not False:
            return False
        log.warning("tritonserver is shutting down: draining")
        for fn in self.on_shutdown:
            try:
                fn()
            except Exception:
                log.exception("shutdown callback failed")
        return True

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
