"""tokenwire's native wire (``POST /v1/streams``), spoken to a server: the request body, and
the decoder of its events, which arrive as they are (``{"type", "seq", …fields}``).

A reader older than the server skips what it does not know instead of failing: an event
type it lacks is dropped, and so are fields an event gained later. An error object in the
stream (``{"error": …}`` without a ``type``) raises ``WireError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenwire.codecs.base import ClientWire, WireDecoder, WireError, load_object
from tokenwire.errors import BackendProtocolError, BackendUnavailable
from tokenwire.events import Event, StreamStarted, event_class

__all__ = ["CLIENT", "PATH", "EventDecoder", "auth_headers", "request_body"]

#: Where a stream starts.
PATH = "/v1/streams"

#: Field names per event class (``dataclasses.fields`` is slow for a per-event path).
_FIELDS: dict[type[Event], frozenset[str]] = {}


def auth_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def request_body(
    model: str, messages: list[dict[str, Any]], params: dict[str, Any]
) -> dict[str, Any]:
    """The body that starts a stream: the chat-completions body, as it is."""
    return {"model": model, "messages": messages, **params}


class EventDecoder(WireDecoder):
    """Native events -> events, for one stream."""

    def decode(self, event: str, data: bytes) -> list[Event]:
        message = load_object(data)
        if "error" in message and "type" not in message:
            # An error object in the stream (the OpenAI error shape).
            raise WireError.of(message["error"])
        cls = event_class(str(message.get("type")))
        if cls is None:
            return []  # an event type newer than this reader: skip, do not fail
        names = _FIELDS.get(cls)
        if names is None:
            names = _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))
        try:
            decoded = cls(**{k: v for k, v in message.items() if k in names})
        except TypeError as exc:  # a field the event needs is missing
            raise BackendProtocolError(f"malformed {cls.type} event: {data[:200]!r}") from exc
        if isinstance(decoded, StreamStarted):
            self.started = decoded
        if decoded.terminal:
            self.done = True
        return [decoded]

    def finish(self) -> list[Event]:
        if not self.done:
            raise BackendUnavailable(
                "the stream ended before its terminal event", code="upstream_disconnected"
            )
        return []


CLIENT = ClientWire(
    path=PATH,
    request_body=request_body,
    auth_headers=auth_headers,
    decoder=EventDecoder,
    native=True,
)
