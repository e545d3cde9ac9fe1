"""Send responses from their own thread, merging a request's queued deltas.

The engine thread must not wait on response IPC: sending one response per token per sequence from
it serialized the sends with the compute (at 64 streams, sends took most of a step). Here the
engine enqueues and goes on; one thread sends, in order. When it lags, consecutive deltas of one
request are merged into one response (text and ids concatenated, counts from the newest), so the
send rate adapts to load and nothing is lost or reordered.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import numpy as np

log = logging.getLogger("tritonvl.pump")

Send = Callable[[dict, bool], None]


def merge(older: dict, newer: dict) -> dict:
    """Two consecutive responses of one request as one."""
    out = dict(newer)
    out["text_output"] = np.array([older["text_output"][0] + newer["text_output"][0]], dtype=np.object_)
    out["output_ids"] = np.concatenate([older["output_ids"], newer["output_ids"]])
    return out


class ResponsePump:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="tritonvl-pump", daemon=True)
        self.thread.start()

    def data(self, send: Send, outputs: dict, final: bool) -> None:
        self.q.put((send, outputs, final, None))

    def error(self, send_error: Callable[[Exception], None], exc: Exception) -> None:
        self.q.put((send_error, None, True, exc))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is sent."""
        done = threading.Event()
        self.q.put((None, None, False, done))
        done.wait(timeout)

    def _run(self) -> None:
        while True:
            batch = [self.q.get()]
            while True:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            pending: dict = {}  # send -> [outputs, final], in first-seen order
            for send, outputs, final, extra in batch:
                if send is None:  # a flush marker: everything before it goes out first
                    self._send_all(pending)
                    pending = {}
                    extra.set()
                elif extra is not None:  # an error ends its request
                    self._send_all({k: v for k, v in pending.items() if k is send})
                    pending.pop(send, None)
                    self._call(send, extra)
                elif send in pending:
                    prev = pending[send]
                    prev[0], prev[1] = merge(prev[0], outputs), prev[1] or final
                else:
                    pending[send] = [outputs, final]
            self._send_all(pending)

    def _send_all(self, pending: dict) -> None:
        for send, (outputs, final) in pending.items():
            self._call(send, outputs, final)

    @staticmethod
    def _call(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # a response the server no longer wants; others go on
            log.exception("sending a response failed")
