"""The one Server-Sent Events decoder: bytes as they arrive in, complete events out.

It serves both ends that read SSE: the gateway's upstream call (``backends/``), which takes
``feed_raw`` (``(event, data bytes, id)`` tuples, nothing decoded that JSON parsing does not
need) on the relay's hot path, and the Python client (``client/``), which takes ``feed``
(``ServerSentEvent`` values with text data).

Whatever the split of the byte stream (one byte at a time, or all at once), the same events
come out with the same ``id``, and the decoder ends with the same ``retry`` and
``last_event_id`` (the WHATWG parsing rules): lines end with CRLF, LF or CR, and a CR at the
very end of a chunk waits for the next one to decide whether an LF belongs to it; a leading
BOM is dropped; ``:`` starts a comment; a field without a colon has an empty value; one space
after the colon is removed; ``data`` lines join with LF; an ``id`` containing NUL is ignored;
``retry`` counts only if it is all ASCII digits; the last event id persists across events;
an event with no data is not dispatched. Each byte is scanned once: only the unfinished last
line of a chunk is kept (as pieces, joined once when its line ending arrives), so a long
event split over many reads costs no rescans. Values are decoded as UTF-8 (errors replaced)
only once their line is complete, so a multibyte character cut between chunks decodes intact.

At the end of a stream an unfinished event is discarded, as the spec says; ``flush()`` is
the one deliberate divergence, for the gateway: an upstream whose body ends right after its
last ``data:`` line (no blank line) still delivers that event.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RawEvent", "SSEDecoder", "ServerSentEvent"]

_BOM = b"\xef\xbb\xbf"

#: One dispatched event, undecoded: ``(event name or "", data, last event id)``.
RawEvent = tuple[str, bytes, str]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the last event id in force when it was dispatched."""

    data: str
    event: str = "message"
    id: str = ""


class SSEDecoder:
    """Incremental SSE decoding (see the module docstring); one instance per stream."""

    __slots__ = (
        "_after_cr",
        "_data",
        "_event",
        "_id",
        "_pending",
        "_start",
        "comments",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # the unfinished last line, in pieces
        self._data: list[bytes] = []
        self._event = b""
        self._id = ""
        self._start = True  # still at the first bytes: a BOM may come
        self._after_cr = False  # the previous chunk ended with CR: skip one LF
        #: The last event id seen (persists across events, as ``EventSource.lastEventId``).
        self.last_event_id = ""
        #: Reconnection time in milliseconds the server asked for, None until it says.
        self.retry: int | None = None
        #: Comment lines seen (heartbeats); a count is enough to know the server is alive.
        self.comments = 0

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode a chunk; return the events it completed, in order, with text data."""
        return [
            ServerSentEvent(data.decode("utf-8", "replace"), event or "message", id)
            for event, data, id in self.feed_raw(chunk)
        ]

    def feed_raw(self, chunk: bytes) -> list[RawEvent]:
        """Decode a chunk; return the events it completed as ``(event, data, id)``, the
        event name ``""`` when the server named none, ``data`` as the bytes it sent."""
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if self._start:
            chunk = self._strip_bom(chunk)
        if b"\r" in chunk:
            self._after_cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        pending = self._pending
        if len(lines) == 1:  # part of a long line: keep the piece, join once
            if chunk:
                pending.append(chunk)
            return []
        if pending:
            pending.append(lines[0])
            lines[0] = b"".join(pending)
            pending.clear()
        tail = lines.pop()
        if tail:
            pending.append(tail)
        out: list[RawEvent] = []
        data = self._data
        for line in lines:
            if not line:
                self.last_event_id = self._id
                if data:
                    event = self._event.decode("utf-8", "replace") if self._event else ""
                    out.append((event, data[0] if len(data) == 1 else b"\n".join(data), self._id))
                    data.clear()
                self._event = b""
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[:1] == b":":
                self.comments += 1
            else:
                self._field(line)
        return out

    def _field(self, line: bytes) -> None:
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value and value.isdigit():
            self.retry = int(value)

    def _strip_bom(self, chunk: bytes) -> bytes:
        """Drop a leading BOM, however the first chunks split it."""
        buffer = b"".join(self._pending) + chunk if self._pending else chunk
        if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
            self._pending = [buffer] if buffer else []
            return b""
        self._start = False
        self._pending = []
        return buffer[len(_BOM) :] if buffer.startswith(_BOM) else buffer

    def pending(self) -> bool:
        """True if bytes of an unfinished event are buffered."""
        return bool(self._pending or self._data)

    def flush(self) -> list[RawEvent]:
        """The stream ended: the event its last lines began, if any (see the module
        docstring: the gateway's leniency, not the spec's rule)."""
        return self.feed_raw(b"\n\n") if self.pending() else []
