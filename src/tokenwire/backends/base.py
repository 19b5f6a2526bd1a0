"""The Backend interface: one method, ``stream(request, cancel)``, like httpx's transports.

A backend turns a ``ChatRequest`` into events and never formats wire output. Its contract:

- Reject a request it cannot serve by raising a ``RequestError`` (or ``Overloaded``)
  *before its first event*; the server then answers with a 4xx and no stream exists.
- Yield a first event as soon as the request is accepted: a ``Progress`` (``queued``,
  ``prefill``, ``connecting``) is fine. The stream's headers and heartbeats start then.
- Then yield ``TextDelta`` / tool-call / ``Usage`` events and finish with exactly one
  ``StreamCompleted``. Errors after the first event are raised as ``BackendError``s; the
  stream manager turns them into ``stream.failed`` with the partial output kept.
- Check ``cancel`` between tokens; once it is set, stop generating at once (close the
  upstream request, stop decoding) and return, optionally after a ``Usage`` event.

The fast path (``PushSource``), the one place where a producer and a reader touch: the
iterator ``stream`` returns may also implement ``push_to(sink)``. Given a sink, it may hand
events to it synchronously as they arrive (in the network callback) while its reader waits,
instead of waking the reader for each: the stream manager's sink journals the event there
and then, and a reader following live writes it to its socket in the same callback
(``Journal.read_batches(direct=…)``, ``transports.sse.DirectWrite``). A relayed chunk then
costs no task switch at all (benchmarks/relay_overhead.py).

The stream manager offers a sink only when no stage wraps the iterator (a stage must see
every event; the manager logs at debug level which stage turned the fast path off) and the
journal appends without awaiting (in-process journals). A sink that refuses an event (the
terminal one, after Stop, past the size limit) ends pushing: the iterator yields that event
and everything after it as usual. ``isinstance(iterator, PushSource)`` tells whether an
iterator offers it.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

from tokenwire.cancel import CancelToken
from tokenwire.events import Event
from tokenwire.requests import ChatRequest

__all__ = ["Backend", "EventSink", "ModelInfo", "PushSource", "is_push_source"]

#: Takes one event synchronously; False refuses it (see the module docstring).
EventSink = Callable[[Event], bool]


@runtime_checkable
class PushSource(Protocol):
    """An event iterator that can push its events to a sink (see the module docstring)."""

    def push_to(self, sink: EventSink) -> None:
        """From now on, hand each event to ``sink`` as it arrives instead of yielding it,
        until ``sink`` refuses one (returns False); yield that one and the rest as usual.
        Called at most once, by the stream manager, between two reads of the iterator."""


#: ``isinstance(…, PushSource)`` per type: on Python 3.11 a runtime-checkable Protocol's
#: check walks the protocol's attributes every time (~15 µs, several per request).
_PUSH_SOURCES: dict[type, bool] = {}


def is_push_source(events: object) -> TypeGuard[PushSource]:
    """``isinstance(events, PushSource)``, decided once per type (its ``push_to`` is a
    method of the class)."""
    known = _PUSH_SOURCES.get(type(events))
    if known is None:
        known = _PUSH_SOURCES[type(events)] = isinstance(events, PushSource)
    return known


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: str
    owned_by: str = "tokenwire"
    created: int = 0


class Backend(abc.ABC):
    #: A short name for logs and metrics (``embedded``, an upstream's NAME …).
    name: str = "backend"

    @abc.abstractmethod
    def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        """Generate the answer to ``request`` as events (see the module docstring)."""

    def continuation(self, request: ChatRequest, partial: str) -> ChatRequest | None:
        """The request that continues the answer to ``request`` after the text ``partial``
        already streamed (a replica taking over a stream whose producer was lost), keeping
        its sampling parameters; None if this backend cannot continue an answer (the stream
        then ends ``producer_lost``). The default cannot."""
        return None

    def models(self) -> list[ModelInfo]:
        """The model names this backend serves, as listed by ``/v1/models``."""
        return []

    def serves(self, model: str) -> bool:
        """Whether ``model`` is one of ``models()`` (the router asks on every request: a
        backend with many names answers without listing them)."""
        return any(info.id == model for info in self.models())

    async def start(self) -> None:  # noqa: B027
        """Load, connect, warm up. Called once before the server accepts requests."""

    async def close(self) -> None:  # noqa: B027
        """Release the model or connections."""
