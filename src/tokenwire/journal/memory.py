"""The in-process journal: the default, and the reference for the others.

Each waiting reader waits on a future of its own that the next append resolves: the writer
wakes it directly (one loop step, no shield in between), and a reader that is cancelled (its
client left) cancels only its own future, never another reader's. A reader that waits caught
up with a direct delivery (``read_batches(direct=…)``) is handed each live event in the
appending task instead, and stays asleep while it takes them: the event reaches its client
with no loop step in between.

Memory is bounded twice: by ``max_finished`` streams and by ``max_bytes`` of events (their
JSON size) and of what protocols store with a stream (``StreamMeta.render``). Either bound
evicts finished streams, oldest first; streams still generating are never evicted
(``max_stream_bytes`` in server/limits.py bounds each of those).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import orjson

from tokenwire.errors import StreamExpired, StreamNotFound
from tokenwire.events import Event
from tokenwire.journal.base import Deliver, Journal, StreamMeta, event_size

__all__ = ["MemoryJournal"]

logger = logging.getLogger("tokenwire.journal")

#: Most events ``read_batches`` hands out at once.
_BATCH = 256


class _Follower:
    """A reader waiting caught up at ``index``, with a direct delivery."""

    __slots__ = ("deliver", "index", "waiter")

    def __init__(self, index: int, deliver: Deliver, waiter: asyncio.Future[None]) -> None:
        self.index = index
        self.deliver = deliver
        self.waiter = waiter

    def took(self, event: Event) -> bool:
        """Whether the direct delivery took ``event`` (then the reader stays asleep)."""
        if event.terminal or event.seq != self.index or self.waiter.done():
            return False  # the end goes the usual way: the reader wakes to finish
        try:
            taken = self.deliver([event])
        except Exception:  # the reader's bug: it meets the event again itself
            logger.exception("direct delivery failed")
            return False
        if taken:
            self.index += 1
        return taken


class _Log:
    __slots__ = ("_followers", "_loop", "_waiters", "events", "finished_at", "meta", "size")

    def __init__(self, meta: StreamMeta) -> None:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self.meta = meta
        self.events: list[Event] = []
        self.finished_at: float | None = None
        self.size = 0
        self._waiters: list[asyncio.Future[None]] | None = None  # None: nobody waits
        self._followers: list[_Follower] | None = None

    def notify(self, event: Event) -> None:
        followers = self._followers
        if followers is not None:
            for follower in followers:
                if not follower.took(event):
                    self._wake_followers(event)
                    break
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

    def _wake_followers(self, event: Event) -> None:
        """Wake the followers that did not take ``event``; those that did stay asleep."""
        followers = self._followers or []
        kept = [f for f in followers if f.index > event.seq]
        for follower in followers:
            if follower.index <= event.seq and not follower.waiter.done():
                follower.waiter.set_result(None)
        self._followers = kept or None

    def follow(self, index: int, deliver: Deliver) -> _Follower:
        follower = _Follower(index, deliver, self._loop.create_future())
        if self._followers is None:
            self._followers = [follower]
        else:
            self._followers.append(follower)
        return follower

    def unfollow(self, follower: _Follower) -> None:
        followers = self._followers
        if followers is not None and follower in followers:
            followers.remove(follower)
            if not followers:
                self._followers = None


class MemoryJournal(Journal):
    appends_nowait = True

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
        log = self._logs[meta.id] = _Log(meta)
        if self.max_bytes and meta.render:
            # What a protocol stores with the stream (a Responses request's input) counts.
            log.size = len(orjson.dumps(meta.render))
            self._bytes += log.size
        self.evict()

    async def append(self, stream_id: str, event: Event) -> int:
        self.append_nowait(stream_id, event)
        return event.seq

    def append_nowait(self, stream_id: str, event: Event) -> bool:
        log = self._logs[stream_id]
        event.seq = len(log.events)
        log.events.append(event)
        if self.max_bytes:
            size = event_size(event)
            log.size += size
            self._bytes += size
        if event.terminal:
            log.finished_at = time.monotonic()
            self._finished[stream_id] = log.finished_at
        log.notify(event)
        if self.max_bytes and self._bytes > self.max_bytes:
            self.evict()
        return True

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

    async def read_batches(
        self, stream_id: str, after: int = -1, *, direct: Deliver | None = None
    ) -> AsyncIterator[list[Event]]:
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
            if direct is None:
                await log.changed()
                continue
            follower = log.follow(index, direct)
            try:
                await follower.waiter
            finally:
                log.unfollow(follower)
            index = follower.index  # past what it delivered directly

    async def meta(self, stream_id: str) -> StreamMeta:
        return self._log(stream_id).meta

    async def snapshot(self, stream_id: str) -> list[Event]:
        return list(self._log(stream_id).events)

    async def delete(self, stream_id: str) -> None:
        log = self._logs.get(stream_id)
        if log is None or log.finished_at is None:
            return  # a stream still generating keeps its log until its terminal event
        del self._logs[stream_id]
        self._finished.pop(stream_id, None)
        self._bytes -= log.size

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
