"""Send responses from their own thread, merging a request's queued deltas.

The engine thread must not wait on response IPC: sending one response per token per sequence from
it serialized the sends with the compute (at 64 streams, sends took most of a step). Here the
engine enqueues and goes on; one thread sends, in order. When it lags, consecutive records of one
request are merged into one response (``older.merged(newer)``: text, ids and logprobs joined, usage
and finish reason from the newest; engine/outputs.SeqOutput), so the send rate adapts to load and
nothing is lost or reordered. A record with ``.finished`` set is the request's last.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("tritonvl.pump")

Send = Callable[[object], None]  # sends one record (its own final flag: record.finished)


class ResponsePump:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="tritonvl-pump", daemon=True)
        self.thread.start()

    # `key` names the request (its sender object): deltas and errors of one request meet under it.
    # Not the callables: a bound method is a new object on every attribute access, and a request's
    # `send` and `send_error` are different callables anyway.
    def data(self, key: object, send: Send, record) -> None:
        self.q.put((key, send, record, None))

    def error(self, key: object, send_error: Callable[[Exception], None], exc: Exception) -> None:
        self.q.put((key, send_error, None, exc))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is sent."""
        done = threading.Event()
        self.q.put((None, None, None, done))
        done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """Send everything queued so far, then end the thread (finalize(): no response may go out, and
        no response sender may be let go, after the stub's link to the server is gone). True when the
        thread ended within ``timeout``."""
        self.q.put((None, None, None, None))
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _run(self) -> None:
        while self._run_once():
            pass

    def _run_once(self) -> bool:
        """Send one batch of what is queued; False once a stop marker was in it (the whole batch is
        sent first)."""
        batch = [self.q.get()]
        while True:
            try:
                batch.append(self.q.get_nowait())
            except queue.Empty:
                break
        go_on = True
        pending: dict = {}  # key -> [send, record], in first-seen order
        for key, send, record, extra in batch:
            if key is None:  # a flush or stop marker: everything before it goes out first
                self._send_all(pending)
                pending = {}
                if extra is None:
                    go_on = False
                else:
                    extra.set()
            elif extra is not None:  # an error ends its request: its queued records go out first
                if key in pending:
                    self._call(*pending.pop(key))
                self._call(send, extra)
            elif key in pending:
                pending[key][1] = pending[key][1].merged(record)
            else:
                pending[key] = [send, record]
        self._send_all(pending)
        return go_on

    def _send_all(self, pending: dict) -> None:
        for send, record in pending.values():
            self._call(send, record)

    @staticmethod
    def _call(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # a response the server no longer wants; others go on
            log.exception("sending a response failed")
