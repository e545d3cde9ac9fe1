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
- Server stopping. On SIGTERM/SIGINT tritonserver 2.51 closes its HTTP port at once (the next
  connection is reset or refused) and only unloads models after every in-flight request ended, so
  finalize() comes too late to drain. The watchdog probes the server's own ``/v2/health/ready`` at
  the address and port it was started with (``--http-address``, ``--http-port``), over a plain
  connection that never goes through a proxy, and calls ``on_shutdown`` once the port is closed
  (refused twice and no socket listens on that port any more) after the server was seen up. An
  HTTP answer of any status (a model loading or unloading makes ready answer 400) is a server
  that is up, never a shutdown; a probe without an answer in time says nothing. A drain begun by
  mistake is taken back (``on_resume``) when the server answers again; docs/CANCELLATION.md.

Registrations live in ``$TMPDIR/tritonvl-stubs-<server pid>-<server start time>``: the start time
(``/proc/<pid>/stat`` field 22) tells a new server that reuses a pid from the dead one whose
registrations are still there. Sibling files are ``<name>.<pid>.<start time>`` for the same reason.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Endpoint:
    """Where tritonserver's HTTP service answers: ``host`` is an IP literal or, for ``AF_UNIX``, a path."""

    family: int
    host: str
    port: int

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.host}"
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


def server_options(server_pid: int) -> dict[str, str] | None:
    """tritonserver's ``--key=value`` / ``--key value`` options (the last one of a key wins)."""
    try:
        args = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    opts: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            opts[key] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return opts


def _ip(text: str, family: int) -> bool:
    try:
        socket.inet_pton(family, text)
        return True
    except (OSError, ValueError):
        return False


def http_endpoint(opts: dict[str, str]) -> Endpoint | None:
    """Where to probe a server started with ``opts`` (None when its HTTP service is off).

    tritonserver 2.51 binds ``--http-address`` as libevhtp reads it: an IPv4 literal (``ipv4:`` may
    prefix it), ``ipv6:<IPv6 literal>`` or ``unix:<path>``; an "any" address (``0.0.0.0``,
    ``ipv6:::``) is probed on the loopback of its family, a specific one at that address. A bare IPv6
    literal (``::``, ``fd00::2``, ``[fd00::2]``) is probed as IPv6 and a host name as resolved;
    2.51 itself listens on 255.255.255.255 for those (seen), which no probe reaches: the listener
    check in ``probe`` keeps such refusals from reading as a shutdown.
    """
    if opts.get("allow-http", "true").strip().lower() in ("false", "0", "off", "no"):
        return None
    addr = opts.get("http-address", "0.0.0.0").strip() or "0.0.0.0"
    if addr.startswith("unix:"):
        return Endpoint(socket.AF_UNIX, addr[5:], 0) if addr[5:] else None
    try:
        port = int(opts.get("http-port", "8000"))
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    if addr.startswith("ipv4:"):
        addr = addr[5:]
    elif addr.startswith("ipv6:"):
        addr = addr[5:]
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    if _ip(addr, socket.AF_INET):
        return Endpoint(socket.AF_INET, "127.0.0.1" if addr == "0.0.0.0" else addr, port)
    if _ip(addr, socket.AF_INET6):
        anywhere = socket.inet_pton(socket.AF_INET6, addr) == bytes(16)
        return Endpoint(socket.AF_INET6, "::1" if anywhere else addr, port)
    return Endpoint(socket.AF_UNSPEC, addr, port) if addr else None


UNANSWERED_WARNING_S = 5.0  # serving this long without one HTTP answer to the probe is logged (once)

# What one probe of the server says.
READY = "ready"  # HTTP 200
NOT_READY = "not ready"  # another HTTP status: the server is up (e.g. a model loading), not stopping
GONE = "gone"  # the port is closed (refused or reset, and nothing listens on it) or the process is gone
UNKNOWN = "unknown"  # no answer in time, or an error that proves nothing


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def http_status(ep: Endpoint, path: str = "/v2/health/ready", timeout: float = 2.0) -> int:
    """The HTTP status of ``GET path`` on ``ep``. A direct connection: http.client knows no proxy, so
    ``http_proxy`` and friends in the server's environment cannot route this probe (urllib's default
    opener would send it to the proxy)."""
    if ep.family == socket.AF_UNIX:
        conn: http.client.HTTPConnection = _UnixConnection(ep.host, timeout)
    else:
        conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def listening(port: int) -> bool | None:
    """Whether any TCP socket of this network namespace listens on ``port`` (None: cannot tell)."""
    seen = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            fields = line.split()
            # local address "ADDR:PORT" (hex), state 0A = LISTEN
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                return True
    return False if seen else None


def probe(ep: Endpoint, server_pid: int | None = None, timeout: float = 2.0) -> str:
    """READY, NOT_READY, GONE or UNKNOWN (see their comments). A refused or reset connection is GONE
    only when no socket listens on the port any more: a refusal at an address the server does not
    listen on (a wrong or unreachable address) is not its port closing."""
    if server_pid is not None and not _alive(server_pid):
        return GONE
    try:
        return READY if http_status(ep, timeout=timeout) == 200 else NOT_READY
    except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError, http.client.RemoteDisconnected):
        pass
    except Exception:  # a timeout on a loaded machine, or anything else: proves nothing
        return UNKNOWN
    if ep.family == socket.AF_UNIX:  # the path is the address: refused there means closed
        return GONE
    return UNKNOWN if listening(ep.port) else GONE


def decide(seen_up: bool, draining: bool, result: str) -> str | None:
    """What the watchdog does on a (confirmed) probe result: "drain", "resume" or nothing.

    - Only a closed port (GONE) after the server was seen up starts a drain.
    - Any HTTP answer while draining takes the drain back: tritonserver never answers again once it
      closed its port on SIGTERM, so an answer means the drain was a mistake.
    - NOT_READY never starts a drain (a model loading, unloading or briefly failing is not a stop).
    """
    if result in (READY, NOT_READY):
        return "resume" if draining else None
    if result == GONE and seen_up and not draining:
        return "drain"
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
                 on_shutdown: Callable[[], None] | None = None, exit_when_orphaned: bool = True,
                 on_resume: Callable[[], None] | None = None) -> None:
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
        # a drain begun by mistake is taken back: these undo what on_shutdown did
        self.on_resume: list[Callable[[], None]] = [on_resume] if on_resume else []
        opts = server_options(self.server_pid)
        self.endpoint = http_endpoint(opts) if opts is not None else None
        self.seen_up = False  # the server answered (or served a request): a closed port now is a stop
        self.answered = False  # an HTTP answer came back at self.endpoint
        self.served_at = 0.0  # when serving() was first called
        self.draining = False
        self._warned = False
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tritonvl-watchdog", daemon=True)
        self.thread.start()
        # only in a stub (the server is its parent): the monitor kills its parent when the server dies
        self.monitor = start_monitor(self.server_pid) if exit_when_orphaned and self.server_pid == self.parent else None

    def serving(self) -> None:
        """The model got a request, so the server is up (its ready probe may not have run yet: a
        SIGTERM right after start must still be seen)."""
        if not self.served_at:
            self.served_at = time.monotonic()
        self.seen_up = True

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
                if self.on_shutdown and self.endpoint is not None:
                    self.check_server()
                if self.check_siblings and not self.draining:
                    dead = self.dead_siblings()
                    if dead and not self._stop.is_set():
                        log.error("stub(s) %s died: stopping the server (pid %d) so it can be restarted",
                                  dead, self.server_pid)
                        # in its own thread: this loop must go on noticing the shutdown (the drain)
                        threading.Thread(target=self._stop_server, name="tritonvl-stop-server", daemon=True).start()
                        self.check_siblings = False
            except Exception:  # this thread must live on: it is what ends an orphaned stub
                log.exception("watchdog check failed")

    def probe(self) -> str:
        return probe(self.endpoint, self.server_pid)

    def check_server(self) -> str | None:
        """One probe (a closed port is probed again before it counts); calls on_shutdown or on_resume
        when ``decide`` says so, and returns what it did."""
        result = self.probe()
        if result in (READY, NOT_READY):
            self.seen_up = self.answered = True
        elif result == GONE and not self.draining:
            result = self.probe()  # a one-off miss is not a shutdown
        if not self.answered and self.served_at and time.monotonic() - self.served_at > UNANSWERED_WARNING_S \
                and not self._warned:
            self._warned = True
            log.warning("tritonserver serves requests but its HTTP service never answered the watchdog at %s: "
                        "a stop is seen only once nothing listens on port %s (docs/CANCELLATION.md)",
                        self.endpoint, self.endpoint.port)
        action = decide(self.seen_up, self.draining, result)
        if action == "drain":
            log.warning("tritonserver's HTTP port %s is closed: the server is shutting down, draining", self.endpoint)
            self.draining = True
            self._call(self.on_shutdown, "shutdown")
        elif action == "resume":
            log.warning("tritonserver answers at %s again (%s): the drain was a mistake, taking it back",
                        self.endpoint, result)
            self.draining = False
            self._call(self.on_resume, "resume")
        return action

    @staticmethod
    def _call(callbacks: list[Callable[[], None]], what: str) -> None:
        for fn in callbacks:
            try:
                fn()
            except Exception:
                log.exception("%s callback failed", what)

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
