"""The in-process journal: the default, and the reference for the others.

Each waiting reader waits on a future of its own that the next append resolves: the writer
wakes it directly (one loop step, no shield in between), and a reader that is cancelled (its
client left) cancels only its own future, never another reader's.

Memory is bounded twice: by ``max_finished`` streams and by ``max_bytes`` of events (their
JSON size). Either bound evicts finished streams, oldest first; streams still generating are
never evicted (``max_stream_bytes`` in server/limits.py bounds each of those).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import orjson

from tokenwire.errors import StreamExpired, StreamNotFound
from tokenwire.events import Event, TextDelta
from tokenwire.journal.base import Journal, StreamMeta

__all__ = ["MemoryJournal"]

#: Most events ``read_batches`` hands out at once.
_BATCH = 256


#: ``{"type":"text.delta","seq":,"text":}`` around a TextDelta's seq and text.
_TEXT_DELTA_SIZE = len(b'{"type":"text.delta","seq":,"text":}')


def _size(event: Event) -> int:
    """An event's JSON size; the per-token case without building its dict."""
    if type(event) is TextDelta:
        return _TEXT_DELTA_SIZE + len(str(event.seq)) + len(orjson.dumps(event.text))
    return len(orjson.dumps(event.to_dict()))


class _Log:
    __slots__ = ("_loop", "_waiters", "events", "finished_at", "meta", "size")

    def __init__(self, meta: StreamMeta) -> None:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self.meta = meta
        self.events: list[Event] = []
        self.finished_at: float | None = None
        self.size = 0
        self._waiters: list[asyncio.Future[None]] | None = None  # None: nobody waits

    def notify(self) -> None:
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for waiter in waiters:
                if not waiter.done():  # a cancelled reader's
                    waiter.set_result(None)

    def changed(self) -> asyncio.Future[None]:
        """A future of the calling reader's own, resolved by the next append."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        waiters = self._waiters
        if waiters is None:
            self._waiters = [waiter]
        else:
            count = len(waiters)
            if count >= 32 and not count & (count - 1):
                # Drop readers that left while the stream idled (at powers of two: O(1)
                # amortized, however many readers fan out).
                waiters[:] = [w for w in waiters if not w.done()]
            waiters.append(waiter)
        return waiter


class MemoryJournal(Journal):
    def __init__(
        self,
        *,
        ttl: float = 600.0,
        max_finished: int = 10_000,
        max_tombstones: int = 100_000,
        max_bytes: int = 0,
    ) -> None:
        self.ttl = ttl
        self.max_bytes = int(max_bytes)  # 0: no byte bound
        self._bytes = 0
        self.max_finished = int(max_finished)
        self.max_tombstones = int(max_tombstones)
        self._logs: dict[str, _Log] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # id -> finished_at, oldest first
        self._tombstones: OrderedDict[str, None] = OrderedDict()  # evicted ids, to answer 410

    async def create(self, meta: StreamMeta) -> None:
        self._logs[meta.id] = _Log(meta)
        self.evict()

    async def append(self, stream_id: str, event: Event) -> int:
        log = self._logs[stream_id]
        event.seq = len(log.events)
        log.events.append(event)
        if self.max_bytes:
            size = _size(event)
            log.size += size
            self._bytes += size
        if event.terminal:
            log.finished_at = time.monotonic()
            self._finished[stream_id] = log.finished_at
        log.notify()
        if self.max_bytes and self._bytes > self.max_bytes:
            self.evict()
        return event.seq

    def _log(self, stream_id: str) -> _Log:
        if self._finished:
            self.evict()  # lazily: the TTL holds even when no new stream triggers a sweep
        log = self._logs.get(stream_id)
        if log is not None:
            return log
        if stream_id in self._tombstones:
            raise StreamExpired(
                f"Stream '{stream_id}' has expired: finished streams are kept for {self.ttl:g}s."
            )
        raise StreamNotFound(f"No stream with id '{stream_id}'.")

    async def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        log = self._log(stream_id)
        index = max(after + 1, 0)
        while True:
            events = log.events
            while index < len(events):
                event = events[index]
                index += 1
                yield event
                if event.terminal:
                    return
            if log.finished_at is not None:
                return  # resumed after the terminal event: nothing more will come
            await log.changed()

    async def read_batches(self, stream_id: str, after: int = -1) -> AsyncIterator[list[Event]]:
        log = self._log(stream_id)
        index = max(after + 1, 0)
        while True:
            events = log.events
            while index < len(events):
                # Bounded, so a long replay is not one huge write.
                batch = events[index : index + _BATCH]
                index += len(batch)
                yield batch
                if batch[-1].terminal:
                    return
            if log.finished_at is not None:
                return
            await log.changed()

    async def meta(self, stream_id: str) -> StreamMeta:
        return self._log(stream_id).meta

    def evict(self, now: float | None = None) -> int:
        """Drop finished streams past their TTL or beyond the count bound, oldest first."""
        now = time.monotonic() if now is None else now
        evicted = 0
        while self._finished:
            stream_id, finished_at = next(iter(self._finished.items()))
            if (
                now - finished_at < self.ttl
                and len(self._finished) <= self.max_finished
                and (not self.max_bytes or self._bytes <= self.max_bytes)
            ):
                break
            del self._finished[stream_id]
            dropped = self._logs.pop(stream_id, None)
            if dropped is not None:
                self._bytes -= dropped.size
            self._tombstones[stream_id] = None
            evicted += 1
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)
        return evicted

    def stats(self) -> dict[str, int]:
        return {
            "streams": len(self._logs),
            "events": sum(len(log.events) for log in self._logs.values()),
            "bytes": self._bytes,
        }
