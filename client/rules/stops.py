"""Stop-string matching over streamed text, shared by the server and the client.

Text arrives in deltas; a stop string may be split across deltas. The matcher never releases
text that could still turn out to be the start of a stop string (hold-back), and cuts the text at
the earliest stop found. Optional ``strip`` strings (special tokens such as ``<|vision_start|>``)
are removed wherever they occur, with the same hold-back, and the text goes on.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Feed text deltas, get back what is safe to show and whether a stop string was hit.

    ``stops``: strings that end the text (cut before them, or after them with ``include_stop``).
    ``strip``: strings deleted from the text wherever they occur.
    Matching is on complete strings: the first stop to be completed wins; when two complete at
    the same start, the longer one.
    """

    def __init__(self, stops: Iterable[str] = (), include_stop: bool = False, strip: Iterable[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.strip = [s for s in strip if s and s not in self.stops]
        self.include_stop = include_stop
        self._patterns = [(s, True) for s in self.stops] + [(s, False) for s in self.strip]
        self._held = ""
        self.stopped: str | None = None  # the stop string that ended the text

    def feed(self, delta: str) -> str:
        """Return the text that can be released now. After a stop, always ''."""
        if self.stopped is not None:
            return ""
        if not self._patterns:
            return delta
        buf, out = self._held + delta, []
        while True:
            at, pattern, is_stop = self._earliest(buf)
            if pattern is None:
                break
            if is_stop:
                self.stopped, self._held = pattern, ""
                out.append(buf[: at + (len(pattern) if self.include_stop else 0)])
                return "".join(out)
            out.append(buf[:at])
            buf = buf[at + len(pattern):]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:]
        out.append(buf[: len(buf) - keep])
        return "".join(out)

    def flush(self) -> str:
        """At the end of the text: release what was held back (it never became a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held

    def _earliest(self, buf: str) -> tuple[int, str | None, bool]:
        best, which, is_stop = -1, None, False
        for pattern, stop in self._patterns:
            i = buf.find(pattern)
            if i >= 0 and (which is None or i < best or (i == best and len(pattern) > len(which))):
                best, which, is_stop = i, pattern, stop
        return best, which, is_stop

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some pattern."""
        best = 0
        for pattern, _ in self._patterns:
            for n in range(min(len(pattern) - 1, len(buf)), best, -1):
                if buf.endswith(pattern[:n]):
                    best = n
                    break
        return best
