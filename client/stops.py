"""Stop-string matching over streamed text, shared by the server and the client.

Text arrives in deltas; a stop string may be split across deltas. The matcher never releases
text that could still turn out to be the start of a stop string (hold-back), and cuts the text at
the earliest stop found.
"""

from __future__ import annotations


class StopStringMatcher:
    """Feed text deltas, get back what is safe to show and whether a stop string was hit."""

    def __init__(self, stops: list[str] | tuple[str, ...] = (), include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self._held = ""
        self.stopped: str | None = None  # the stop string that ended the text

    def feed(self, delta: str) -> str:
        """Return the text that can be released now. After a stop, always ''."""
        if self.stopped is not None:
            return ""
        if not self.stops:
            return delta
        buf = self._held + delta
        first, which = -1, None
        for stop in self.stops:
            i = buf.find(stop)
            # earliest start wins; on a tie the longer stop (it contains the shorter one's start)
            if i >= 0 and (first < 0 or i < first or (i == first and len(stop) > len(which))):
                first, which = i, stop
        if which is not None:
            self.stopped = which
            self._held = ""
            return buf[: first + (len(which) if self.include_stop else 0)]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of the text: release what was held back (it never became a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
