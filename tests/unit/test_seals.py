"""Seals (handlers/seals.py): one key per server shared by its stubs, made once; a seal covers every byte,
dtype and shape of what it seals; checks refuse a missing or wrong seal unless internal_inputs is open."""

from __future__ import annotations

import os
import stat
import threading

import numpy as np
import pytest

from tritonvl.client.rules.errors import InvalidArgument
from tritonvl.handlers.seals import Sealer, load_key, server_dir


def test_one_key_per_server_made_once_and_private(tmp_path):
    keys = []
    threads = [threading.Thread(target=lambda: keys.append(load_key(tmp_path / "srv"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE(os.stat(tmp_path / "srv" / "pipeline.key").st_mode) == 0o600
    assert load_key(tmp_path / "other") != keys[0]
    assert server_dir(os.getpid()).name.startswith(f"tritonvl-stubs-{os.getpid()}-")


def test_a_seal_covers_values_dtype_and_shape(tmp_path):
    s = Sealer(load_key(tmp_path))
    ids, grid = np.arange(10, dtype=np.int32), np.array([[1, 2, 2]], np.int64)
    seal = s.seal("request", ids, grid, b"{}")
    s.check(seal, "request", ids, grid, b"{}", what="llm")
    changed = [(ids + 1, grid, b"{}"), (ids.astype(np.int64), grid, b"{}"), (ids.reshape(2, 5), grid, b"{}"),
               (ids, grid, b"{ }")]
    for parts in changed:
        with pytest.raises(InvalidArgument, match="request_seal: does not match"):
            s.check(seal, "request", *parts, what="llm")
    with pytest.raises(InvalidArgument, match="request_seal: does not match"):
        s.check(s.seal("embeds", ids, grid, b"{}"), "request", ids, grid, b"{}", what="llm")  # another kind
    with pytest.raises(InvalidArgument, match="request_seal: missing"):
        s.check(None, "request", ids, grid, b"{}", what="llm")
    with pytest.raises(InvalidArgument):
        Sealer(load_key(tmp_path / "b")).check(seal, "request", ids, grid, b"{}", what="llm")  # another server
    Sealer(load_key(tmp_path), enforce=False).check(None, "request", ids, what="llm")  # internal_inputs=open
    empty = np.zeros((0, 1176), np.float32)  # a text-only request's pixel_values
    s.check(s.seal("pixel", empty, np.zeros((0, 3), np.int64)), "pixel", empty, np.zeros((0, 3), np.int64), what="v")
    with pytest.raises(InvalidArgument):
        s.check(s.seal("pixel", empty), "pixel", np.zeros((0, 1175), np.float32), what="v")
