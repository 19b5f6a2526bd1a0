"""The Journal interface — the event log: append numbered events, read them back and follow
live. What replicas tell each other beside the log (Stop, readers, liveness, ownership) is
the control plane (``journal/control.py``); each journal carries the one that goes with it.

A journal promises, per stream:
- ``append`` numbers events 0, 1, 2 … in the order it is called (one producer per stream);
- ``read(after=n)`` yields every event with ``seq > n`` exactly once, in order, first the
  replay and then live ones as they are appended, with no gap and no duplicate at the seam,
  and returns after the terminal event;
- a finished stream stays readable for ``ttl`` seconds, then reads raise ``StreamExpired``;
  a stream it never saw raises ``StreamNotFound``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenwire.events import Event, TextDelta
from tokenwire.journal.control import ControlPlane, LocalControlPlane

__all__ = ["Deliver", "Journal", "StreamMeta", "event_size"]

#: ``{"type":"text.delta","seq":,"text":}`` around a TextDelta's seq and text.
_TEXT_DELTA_SIZE = len(b'{"type":"text.delta","seq":,"text":}')


def event_size(event: Event) -> int:
    """Bytes an event takes in a journal (its JSON form)."""
    if type(event) is TextDelta:
        # The per-token case, without building the dict: the same bytes as below.
        return _TEXT_DELTA_SIZE + len(str(event.seq)) + len(orjson.dumps(event.text))
    return len(orjson.dumps(event.to_dict()))


#: A reader's direct delivery (``Journal.read_batches``): True if it took the events.
Deliver = Callable[[list[Event]], bool]


@dataclass(slots=True, kw_only=True)
class StreamMeta:
    """What a reader needs to render a stream in the protocol it was started in."""

    id: str
    model: str
    protocol: str  # the name of the WireProtocol it was started in (protocols/registry.py)
    created: int
    owner: str | None = None
    #: Protocol options fixed at start (e.g. include_usage); stored so resumes render alike.
    render: dict[str, Any] = field(default_factory=dict)
    #: What the server decided about the stream when it started it (``cache``: ``hit`` or
    #: ``miss``); sent as response headers on every read of it.
    labels: dict[str, str] = field(default_factory=dict)
    #: The request (``ChatRequest.to_dict``), kept where replicas share the journal, so that
    #: another replica can continue the stream if its producer is lost (streams.py).
    request: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "model": self.model,
            "protocol": self.protocol,
            "created": self.created,
            "owner": self.owner,
            "render": self.render,
            "labels": self.labels,
        }
        if self.request is not None:
            data["request"] = self.request
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamMeta:
        return cls(**data)


class Journal(abc.ABC):
    """The event log: create, append, read, metadata. ``MemoryJournal`` is the reference
    implementation."""

    #: The control plane over the same store: ``LocalControlPlane`` (does nothing) for
    #: in-process journals; a shared store supplies its own (``journal/redis/control.py``).
    control: ControlPlane = LocalControlPlane()
    #: True when ``append_nowait`` stores events (in-process journals): then a backend may
    #: journal events from its network callback (``StreamManager``).
    appends_nowait: bool = False

    @abc.abstractmethod
    async def create(self, meta: StreamMeta) -> None:
        """Register a new stream before its first event."""

    def resume_producing(self, stream_id: str, next_seq: int, meta: StreamMeta) -> None:
        """Append to ``stream_id`` from ``next_seq`` on, after ``control.claim`` gave this
        process the stream (shared journals only: nothing else can claim one)."""
        raise NotImplementedError(f"{type(self).__name__} does not share streams")

    @abc.abstractmethod
    async def append(self, stream_id: str, event: Event) -> int:
        """Number ``event`` (sets ``event.seq``), store it, wake readers; returns the seq."""

    def append_nowait(self, stream_id: str, event: Event) -> bool:
        """As ``append``, at once, if this journal can (in-process ones): then True. False:
        it cannot without awaiting (nothing was stored); call ``append``."""
        return False

    @abc.abstractmethod
    def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Replay events with ``seq > after``, then follow live until the terminal event."""

    async def read_batches(
        self, stream_id: str, after: int = -1, *, direct: Deliver | None = None
    ) -> AsyncIterator[list[Event]]:
        """As ``read``, but each item is every event already stored (in order), so a
        reader can write them in one send; journals that cannot tell yield one at a time.

        ``direct``, where the journal supports it (in-process ones), is called with each
        non-terminal event appended while this reader waits caught up, in the appending
        task: if it delivers the event (returns True), the reader moves past it without
        waking. This is how a live chunk reaches its client in the producer's own loop
        step. It must not block or raise; False leaves the event to the reader."""
        async for event in self.read(stream_id, after):
            yield [event]

    @abc.abstractmethod
    async def meta(self, stream_id: str) -> StreamMeta:
        """The stream's metadata; raises ``StreamNotFound`` or ``StreamExpired``."""

    async def snapshot(self, stream_id: str) -> list[Event]:
        """Every event stored so far, in order, without waiting for more (a poll: the
        Responses API's ``GET``); raises ``StreamNotFound`` or ``StreamExpired``."""
        raise NotImplementedError

    async def delete(self, stream_id: str) -> None:
        """Forget a finished stream (its events and meta): later reads raise
        ``StreamNotFound``. Cancel a stream still generating and wait for its end first."""
        raise NotImplementedError

    async def start(self) -> None:  # noqa: B027
        """Connect and start background work (retention sweeps)."""

    async def close(self) -> None:  # noqa: B027
        """Flush and release resources."""

    def stats(self) -> dict[str, int]:
        """Sizes for /metrics: streams held, events held."""
        return {}
