"""What a wire's decoder is: SSE messages of one response in, tokenwire events out.

Both readers of a wire use the same decoder: the gateway's upstream call and the Python
client. A decoder is stateful for one response and knows nothing of sockets or sequence
numbers. It raises, never returns, a failure:

- ``WireError`` (a ``BackendUnavailable``): the stream itself said it failed (an
  ``{"error": …}`` chunk, an ``error`` event); ``error`` keeps the wire's own error object,
  so the client can report it as the server sent it;
- ``BackendProtocolError``: a message that is not what the wire allows (not JSON, wrong
  shapes), so no reader crashes on a foreign server's bytes;
- from ``finish()``, ``BackendUnavailable``: the body ended before the answer did.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from tokenwire.errors import BackendProtocolError, BackendUnavailable
from tokenwire.events import Event, StreamStarted

__all__ = ["ClientWire", "WireDecoder", "WireError", "load_object"]


class WireError(BackendUnavailable):
    """The stream said it failed; ``error`` is its error object (``type``, ``message`` …)."""

    def __init__(self, message: str, error: dict[str, Any]) -> None:
        super().__init__(message, code="upstream_error")
        self.error = error

    @classmethod
    def of(cls, error: Any) -> WireError:
        """From a stream's error value (an object, or only a message)."""
        error = dict(error) if isinstance(error, dict) else {"message": str(error)}
        return cls(f"upstream error: {error.get('message')}", error)


class WireDecoder(abc.ABC):
    """Turns one response's SSE messages into events (one instance per response)."""

    #: The wire sent its terminal message; later messages carry nothing.
    done: bool = False
    #: What the wire said of the response when it began (its id, model, time), for a reader
    #: that announces the stream itself (the client); None until then.
    started: StreamStarted | None = None

    @abc.abstractmethod
    def decode(self, event: str, data: bytes) -> list[Event]:
        """Events for one SSE message (``event`` is ``""`` when it has no name)."""

    @abc.abstractmethod
    def finish(self) -> list[Event]:
        """The body ended: the closing events, or raise if the wire stopped short."""


def load_object(data: bytes) -> dict[str, Any]:
    """One message's JSON object, or ``BackendProtocolError``."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BackendProtocolError(f"malformed stream message (not JSON): {data[:200]!r}") from exc
    if not isinstance(value, dict):
        raise BackendProtocolError(f"malformed stream message: {data[:200]!r}")
    return value


#: A client's request: ``(model, chat-shaped messages, other parameters)`` -> JSON body.
RequestBody = Callable[[str, list[dict[str, Any]], dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class ClientWire:
    """What a client needs to start a stream of one wire and read it (the Python client's
    ``protocol=``): each codec module declares one as ``CLIENT``."""

    #: Where a stream starts, from the server's root (``/v1/chat/completions``).
    path: str
    #: Chat-shaped arguments (what every client protocol takes) as this wire's body.
    request_body: RequestBody
    #: The wire's headers, with the API key if there is one.
    auth_headers: Callable[[str | None], dict[str, str]]
    #: A fresh decoder for one stream.
    decoder: Callable[[], WireDecoder]
    #: The wire sends tokenwire's own events (seq, ``stream.started``) rather than its own.
    native: bool = False
