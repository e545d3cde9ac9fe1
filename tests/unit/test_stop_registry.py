"""Explicit stops by key (handlers/llm/stops.py): a stop reaches the job it was meant for, also when it
overtakes it by a little, never a later request that reuses the key; the keys kept are bounded."""

from __future__ import annotations

import time

from tritonvl.handlers.llm.stops import StopRegistry


def test_stop_reaches_the_live_job_and_one_it_overtook():
    reg = StopRegistry(grace_seconds=0.5)
    live = reg.watch("a")
    assert not live()
    reg.stop("a")
    assert live()
    reg.stop("b")  # the front's stop came first; its request arrives just after
    assert reg.watch("b")()


def test_a_later_request_reusing_the_key_is_not_stopped():
    reg = StopRegistry(grace_seconds=0.2)
    reg.stop("1")
    time.sleep(0.3)
    later = reg.watch("1")  # a client that sends every request with id "1"
    assert not later()
    reg.stop("1")  # a stop meant for it does reach it
    assert later()


def test_a_flood_of_stops_is_bounded():
    reg = StopRegistry(max_keys=1000)
    for i in range(50_000):
        reg.stop(f"k{i}")
    assert len(reg._keys) == 1000 and "k49999" in reg._keys
    assert not reg.watch("")()
