"""Wire protocols the client speaks, each read through its codec into ``tokenwire.events``.

- ``native``: tokenwire's ``POST /v1/streams``; the events arrive as they are.
- ``openai``: ``POST /v1/chat/completions`` with ``stream: true`` on any OpenAI-compatible
  server (tokenwire, vLLM, llama.cpp, OpenAI …); chunks become events.
- ``anthropic``: ``POST /v1/messages`` on any Anthropic Messages server; its event types
  (``message_start``, ``content_block_delta`` …) become events.
- ``responses``: ``POST /v1/responses`` (OpenAI's Responses API) with ``stream: true``; its
  events (``response.output_text.delta`` …) become events, and a cancelled response's
  ``response.cancelled`` becomes ``stream.cancelled``.

The decoding is the wire's codec (``tokenwire.codecs``), the same one the gateway uses on
its upstreams. A mapper adds what only a reader of a whole stream needs, and knows nothing
of sockets: the request's path, body and headers; ``seq`` numbers (the SSE ``id`` when the
server sends numeric ids, as tokenwire does for every protocol, else a running count); a
``stream.started`` for wires that have none; a failure the stream reports becomes a
``stream.failed`` event rather than an exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from tokenwire.codecs import (
    ClientWire,
    ServerSentEvent,
    WireError,
    anthropic,
    native,
    openai,
    responses,
)
from tokenwire.errors import BackendError
from tokenwire.events import Event, StreamFailed, StreamStarted

__all__ = ["Mapper", "ProtocolName", "build_request", "mapper_for", "to_wire_messages"]

ProtocolName = Literal["native", "openai", "anthropic", "responses"]


def to_wire_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Dicts pass through; ``tokenwire.Message`` (or any dataclass) becomes a dict."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, Mapping):
            out.append(dict(message))
        elif dataclasses.is_dataclass(message) and not isinstance(message, type):
            data = {"role": message.role, "content": message.content}  # type: ignore[attr-defined]
            out.append(data)
        else:
            raise TypeError(f"a message must be a dict or tokenwire.Message, not {message!r}")
    return out


_WIRES: dict[str, ClientWire] = {
    "native": native.CLIENT,
    "openai": openai.CLIENT,
    "anthropic": anthropic.CLIENT,
    "responses": responses.CLIENT,
}


def _wire(protocol: str) -> ClientWire:
    try:
        return _WIRES[protocol]
    except KeyError:
        raise ValueError(
            f"unknown protocol {protocol!r}: use one of {', '.join(sorted(_WIRES))}"
        ) from None


def build_request(
    protocol: ProtocolName, model: str, messages: list[dict[str, Any]], params: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``(path, json body)`` that starts a stream in ``protocol``."""
    wire = _wire(protocol)
    return wire.path, wire.request_body(model, messages, params)


def auth_headers(protocol: ProtocolName, api_key: str | None) -> dict[str, str]:
    return {"accept": "text/event-stream", **_wire(protocol).auth_headers(api_key)}


def mapper_for(protocol: str) -> Mapper:
    return Mapper(protocol, _wire(protocol))


class Mapper:
    """One stream of one wire protocol, client side: its SSE events as tokenwire events
    (through the wire's codec)."""

    def __init__(self, protocol: str, wire: ClientWire) -> None:
        self.protocol = protocol
        self._native = wire.native
        self._decoder = wire.decoder()
        self._count = -1
        self._announced = False
        self._failed = False
        self.stream_id: str | None = None

    def _seq(self, sse: ServerSentEvent) -> int:
        if sse.id.isdigit():
            self._count = int(sse.id)
        else:
            self._count += 1
        return self._count

    def on_event(self, sse: ServerSentEvent) -> list[Event]:
        seq = self._seq(sse)
        if self._failed:
            return []
        try:
            events = self._decoder.decode(sse.event, sse.data.encode())
        except WireError as exc:
            self._failed = True
            return [StreamFailed(seq=seq, error=exc.error)]
        return self._numbered(seq, events)

    def on_eof(self) -> list[Event]:
        """Events to finish with when the server closed cleanly without a terminal one
        (none when the answer was cut short: the stream is then interrupted)."""
        if self._failed or self._decoder.done:
            return []
        try:
            return self._numbered(self._count, self._decoder.finish())
        except BackendError:
            return []

    def _numbered(self, seq: int, events: list[Event]) -> list[Event]:
        if self._native:  # tokenwire's events carry their own seq and stream.started
            if events and isinstance(events[0], StreamStarted):
                self.stream_id = events[0].id
            return events
        started = self._decoder.started
        if not self._announced and started is not None:
            self._announced = True
            started.id = self.stream_id or started.id
            events = [started, *events]
        for event in events:
            event.seq = seq
        return events
