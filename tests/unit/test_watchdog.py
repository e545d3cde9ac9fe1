"""The stub watchdog: a sibling that dies unregistered stops the server; a clean unload does not."""

import subprocess
import time

from tritonvl.handlers.tritonserver.watchdog import Watchdog


def wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def test_dead_sibling_stops_the_server():
    server = subprocess.Popen(["sleep", "60"])
    sibling = subprocess.Popen(["sleep", "60"])
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, grace_seconds=2)
    (dog.dir / f"b.{sibling.pid}").write_text(str(sibling.pid))
    time.sleep(0.3)
    assert server.poll() is None  # everyone alive: nothing happens
    sibling.kill()
    sibling.wait()
    assert wait(lambda: server.poll() is not None)
    dog.stop()


def test_clean_unload_is_not_a_crash():
    server = subprocess.Popen(["sleep", "60"])
    sibling = subprocess.Popen(["sleep", "60"])
    dog = Watchdog("a", server_pid=server.pid, interval=0.05, grace_seconds=2)
    registration = dog.dir / f"b.{sibling.pid}"
    registration.write_text(str(sibling.pid))
    registration.unlink()  # what the sibling's finalize does first (Watchdog.stop)
    sibling.kill()
    sibling.wait()
    time.sleep(0.5)
    assert server.poll() is None
    dog.stop()
    server.kill()
