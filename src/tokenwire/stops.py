"""Stop sequences: text after a stop never reaches the client, even split across tokens.

``StopMatcher`` holds back only the tail of the text that could still begin a stop sequence,
so everything else leaves at once. Backends that decode themselves (the embedded model) run
it inside the decode loop, which stops decoding on the very token that completed the match
and keeps token usage exact; upstream servers get ``stop`` forwarded and apply it there.
"""

from __future__ import annotations

__all__ = ["StopMatcher"]


class StopMatcher:
    __slots__ = ("_held", "_max_hold", "_sent", "stops")

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self._sent = 0  # leading characters of _held the client already has (prime)
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1

    def prime(self, text: str) -> None:
        """Start after ``text``, which the client already has (a continued stream): a stop
        that begins in it and ends in new text still matches, and none of it is sent again.
        """
        if not self.stops or not text:
            return
        hold = min(self._max_hold, len(text))
        self._held = text[len(text) - hold :] if hold else ""
        self._sent = len(self._held)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit now, whether a stop matched).

        After a match the returned text is everything before the stop; the rest is dropped.
        """
        if not self.stops:
            return text, False
        sent = self._sent
        buffer = self._held + text
        # Generation stops where a stop sequence is first *completed* (the earliest end),
        # so the result does not depend on how the text was split into tokens.
        cut_end = cut_start = -1
        for stop in self.stops:
            index = buffer.find(stop)
            if index == -1:
                continue
            end = index + len(stop)
            if cut_end == -1 or end < cut_end or (end == cut_end and index < cut_start):
                cut_end, cut_start = end, index
        if cut_end != -1:
            self._held, self._sent = "", 0
            return buffer[sent:cut_start], True
        hold = self._holdback(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        out = buffer[: len(buffer) - hold]
        self._sent = max(0, sent - len(out))
        return out[sent:], False

    def _holdback(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop."""
        for length in range(min(self._max_hold, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0

    def flush(self) -> str:
        """Text held back when generation ended without completing a stop."""
        held, sent = self._held, self._sent
        self._held, self._sent = "", 0
        return held[sent:]
