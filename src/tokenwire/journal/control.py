"""The control plane: what replicas sharing a journal tell each other about a stream.

The event log (``Journal``) stores and replays events; the control plane carries what is not
an event: Stop from any replica (the cancel bus), which readers are connected anywhere
(presence), whether a stream's producer is alive (liveness), and who produces a stream
(ownership: producing, claiming a stream whose producer was lost, releasing one on shutdown).

Where nothing is shared (one process, the memory journal) there is no one to tell, and
``LocalControlPlane`` does nothing: the stream manager cancels and counts readers itself.
A new shared store implements the log and this interface over one client (``journal/redis/``).

Ownership promises, for shared control planes:
- a stream has at most one producer at a time, recorded in the store; appends from any other
  process are refused (``StreamHandedOver``), so a producer that was presumed dead and claimed
  cannot write into the stream after the claim;
- ``claim`` is atomic: of any number of replicas claiming the same lost stream, one wins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

__all__ = ["Claim", "ControlPlane", "LocalControlPlane", "OrphanHandler", "ProducerState"]

#: Asked about a stream whose producer was lost, before it is ended ``producer_lost``: True
#: if it is taken care of (this process took it over, or leaves it to another replica),
#: False to end it. Set by the stream manager (takeover, streams.py).
OrphanHandler = Callable[[str], Awaitable[bool]]


class ProducerState:
    """What ``ControlPlane.end_if_orphaned`` found (ints, as the store's script returns)."""

    MISSING = -1  # no such stream (never was, expired, or the store lost it)
    ENDED = -2  # it has its terminal event
    ALIVE = 0  # its producer heartbeats (or it is being claimed)
    LOST = -3  # its producer is lost (checked without ending it: ``on_orphan`` decides)
    # n > 0: its producer was lost, and this call wrote the terminal ``producer_lost`` event


@dataclass(slots=True, frozen=True)
class Claim:
    """A stream this process now produces after its producer was lost or released it."""

    stream_id: str
    #: The seq the next appended event gets (events 0 … next_seq - 1 are stored).
    next_seq: int
    #: The node that produced it before (for logs).
    previous: str | None


class ControlPlane:
    """Cancel bus, reader presence, producer liveness and stream ownership."""

    #: True when other processes share this control plane: then a stream may have readers
    #: and producers this process cannot see.
    shared: bool = False
    #: Takeover: see ``OrphanHandler``; None ends every orphaned stream ``producer_lost``.
    on_orphan: OrphanHandler | None = None

    async def start(self) -> None:
        """Connect and start background work (heartbeat, cancel listener, sweeps)."""

    async def close(self) -> None:
        """Stop background work; other replicas learn at once that this one is gone."""

    # -- ownership and liveness ----------------------------------------------------------

    async def produce(self, stream_id: str) -> None:
        """Record that this process produces ``stream_id``, before its log is created."""

    def stopped_producing(self, stream_id: str) -> None:
        """This process no longer produces ``stream_id`` (it ended, or was handed over)."""

    async def claim(self, stream_id: str) -> Claim | None:
        """Take over ``stream_id`` if its producer was lost or released it: atomically, so
        exactly one caller gets the ``Claim``; None if someone alive produces it, it has
        ended, or nothing is shared."""
        return None

    async def release(self, stream_id: str) -> None:
        """Give ``stream_id`` up (graceful shutdown) so another replica claims it at once."""

    async def end_if_orphaned(self, stream_id: str) -> int:
        """End ``stream_id`` with ``stream.failed`` ``producer_lost`` if its producer is
        gone; returns a ``ProducerState`` value (or the terminal's seq + 1 if it wrote it)."""
        return ProducerState.ALIVE

    # -- cancel bus ----------------------------------------------------------------------

    async def signal_cancel(self, stream_id: str, reason: str) -> None:
        """Ask whichever process produces ``stream_id`` to cancel it."""

    def cancel_requests(self) -> AsyncIterator[tuple[str, str]] | None:
        """Cancel signals addressed to streams this process produces, or None if nothing
        is shared (the stream manager then cancels directly)."""
        return None

    # -- names ---------------------------------------------------------------------------

    async def name_stream(self, name: str, stream_id: str) -> None:
        """Remember ``stream_id`` under ``name``, a wire's own name for a stream (the UI
        message stream's chat id), for every replica while the stream is retained; a later
        name replaces an earlier one. Nothing shared: the server keeps names itself."""

    async def named_stream(self, name: str) -> str | None:
        """The stream last named ``name`` (``name_stream``), or None."""
        return None

    # -- reader presence -----------------------------------------------------------------

    async def hold_presence(self, stream_id: str, reader: str, until: float) -> None:
        """Reader ``reader`` of ``stream_id`` is connected until wall time ``until``."""

    def reader_left(self, stream_id: str, reader: str) -> None:
        """Reader ``reader`` has gone (recorded in the background: callers may be cancelled)."""

    async def reader_seen(self, stream_id: str) -> float | None:
        """Wall-clock time until which a reader of ``stream_id`` is known connected, in any
        process (in the future while one holds a presence lease), or None if not tracked."""
        return None


class LocalControlPlane(ControlPlane):
    """One process: nothing to tell anyone. Every method is the interface's no-op."""
