"""Stop strings over streamed text: emit what is safe now, hold back what may be the start of a stop.

A stop string can arrive split across deltas ("Ob" + "served"), so a suffix of
the text seen so far that is a prefix of some stop string is held back until
the next delta proves it is (or is not) a stop. The stop string itself is
never emitted, nor anything after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class StopStep(NamedTuple):
    #: Text that is safe to emit now (possibly empty).
    text: str
    #: True once a stop string was hit; feed nothing more after that.
    stopped: bool


class StopMatcher:
    def __init__(self, stops: Iterable[str], *, include: bool = False) -> None:
        """``include``: the stop string that ends the text is emitted too (vLLM's ``include_stop_str_in_output``)."""
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> StopStep:
        """Take the next delta; return what may be emitted and whether a stop was hit."""
        if self.stopped:
            return StopStep("", True)
        if not self.stops:  # the common case, once per token: nothing to look for
            return StopStep(text, False)
        buffer = self._held + text
        hit = self._first_stop(buffer)
        if hit is not None:
            at, stop = hit
            self._held, self.stopped = "", True
            return StopStep(buffer[:at + (len(stop) if self.include else 0)], True)
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return StopStep(buffer[: len(buffer) - keep], False)

    def flush(self) -> str:
        """The text still held back, once generation ended without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, buffer: str) -> tuple[int, str] | None:
        """Where the earliest stop string starts, and which (the longest, of those starting there)."""
        found = [(i, -len(s), s) for s in self.stops if (i := buffer.find(s)) >= 0]
        return (min(found)[0], min(found)[2]) if found else None

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that a stop string starts with."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for size in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
