"""An incremental Server-Sent Events decoder, byte-exact to the WHATWG parsing rules.

Bytes go in as they arrive, in chunks of any size; complete events come out. Whatever the
split of the byte stream (one byte at a time, or all at once), the same events come out with
the same ``id`` and the decoder ends with the same ``retry`` and ``last_event_id``: lines end
with CRLF, LF or CR, and a CR at the very end of a chunk waits for the next one before it
decides whether an LF belongs to it. Only the bytes up to the last line ending are decoded
(CR and LF never occur inside a UTF-8 sequence), so a multibyte character cut between chunks
decodes intact.

Rules kept from the spec: a leading BOM is dropped; ``:`` starts a comment; a field without a
colon has an empty value; one space after the colon is removed; ``data`` lines join with LF;
an ``id`` containing NUL is ignored; ``retry`` counts only if it is all ASCII digits; the last
event id persists across events; an event with no data is not dispatched; an incomplete event
at the end of the stream is discarded (call nothing at EOF).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent"]

_BOM = b"\xef\xbb\xbf"
_LINE_ENDING = re.compile("\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the last event id in force when it was dispatched."""

    data: str
    event: str = "message"
    id: str = ""


class SSEDecoder:
    def __init__(self) -> None:
        self._buffer = b""
        self._pending: list[bytes] = []
        self._start = True  # still at the first bytes: a BOM may come
        self._after_cr = False  # the previous chunk ended with CR: skip one LF
        self._data: list[str] = []
        self._event = ""
        self._id_buffer = ""
        #: The last event id seen (persists across events, as ``EventSource.lastEventId``).
        self.last_event_id = ""
        #: Reconnection time in milliseconds the server asked for, None until it says.
        self.retry: int | None = None
        #: Comment lines seen (heartbeats); a count is enough to know the server is alive.
        self.comments = 0

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode a chunk; return the events it completed, in order."""
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if not self._start and b"\n" not in chunk and b"\r" not in chunk:
            # Part of a long line: keep the pieces, join once (no quadratic re-copying).
            self._pending.append(chunk)
            return []
        if self._pending:
            self._buffer += b"".join(self._pending)
            self._pending.clear()
        buffer = self._buffer + chunk
        if self._start:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer
                return []
            self._start = False
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        # Everything up to the last line ending is complete; the rest waits for more bytes.
        last_lf = buffer.rfind(b"\n")
        last_cr = buffer.rfind(b"\r")
        end = max(last_lf, last_cr)
        if end == -1:
            self._buffer = buffer
            return []
        self._buffer = buffer[end + 1 :]
        if end == last_cr and end == len(buffer) - 1:
            # CR last in the chunk: an LF at the start of the next one is its pair.
            self._after_cr = True
        if end == last_lf and end > 0 and buffer[end - 1] == 0x0D:
            end -= 1  # the CR of a final CRLF is part of the same line ending
        text = buffer[:end].decode("utf-8", "replace")
        lines = _LINE_ENDING.split(text) if "\r" in text else text.split("\n")
        events: list[ServerSentEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id_buffer
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            data="\n".join(self._data), event=self._event or "message", id=self.last_event_id
        )
        self._data = []
        self._event = ""
        return event
