"""The Redis event log: each stream's events in a Redis Stream that every replica can replay
and follow (keys: ``journal/redis/client.py``; the control plane beside it:
``journal/redis/control.py``).

Promises beyond ``Journal``'s:
- Appends are group-committed. ``append`` numbers the event and queues it; one flusher task
  writes whatever is queued, for all streams, in one pipeline (one Lua call per stream), so a
  token costs a list append on the producer and a share of one round trip. The terminal
  event's ``append`` returns only once everything before it is stored.
- Only the stream's producer (``ControlPlane.produce`` / ``claim``) may append: a producer
  another replica took the stream from gets ``StreamHandedOver``.
- A reader holds a presence lease while it reads and, when the stream is quiet for a
  heartbeat, asks the control plane whether its producer is still alive (a lost producer's
  stream is ended ``producer_lost``), so no reader waits for ever.
- redis-py exceptions surface as ``JournalError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from redis.exceptions import RedisError, ResponseError

from tokenwire.errors import JournalError, StreamExpired, StreamHandedOver, StreamNotFound
from tokenwire.events import Event, StreamFailed
from tokenwire.journal.base import Journal, StreamMeta
from tokenwire.journal.control import ProducerState
from tokenwire.journal.redis.client import (
    APPEND,
    RESTORE,
    RedisClient,
    decode,
    encode,
    encode_json,
    guarded,
    translated,
)
from tokenwire.journal.redis.control import RedisControlPlane

__all__ = ["RedisJournal"]

_T = TypeVar("_T")

log = logging.getLogger("tokenwire.journal.redis")

#: Events a stream may have queued before ``append`` waits for Redis (backpressure).
_MAX_PENDING = 1024

#: Seconds a reader waits out an outage beyond the producer's bound (see ``read``).
_READER_MARGIN = 3.0

#: Longest pause between retries while Redis is unreachable.
_MAX_BACKOFF = 1.0


def _journal_unavailable(outage: float) -> StreamFailed:
    return StreamFailed(
        error={
            "type": "journal_error",
            "message": f"Redis was unreachable for more than {outage:g}s; "
            "the output above is all that was stored.",
            "code": "journal_unavailable",
        }
    )


class _Lease:
    """A reader's presence: its id and the wall time it is known connected until."""

    __slots__ = ("reader", "until")

    def __init__(self, reader: str) -> None:
        self.reader = reader
        self.until = 0.0


class _Producing:
    """A stream this process appends to. Its events are kept here until its terminal event
    is stored, so whatever Redis loses (a restart, a failover) can be appended again."""

    __slots__ = (
        "base",
        "error",
        "events",
        "finished_at",
        "meta",
        "outage_since",
        "sent",
        "stored",
        "terminal",
        "verify",
    )

    def __init__(self, meta: bytes | None, base: int = 0) -> None:
        self.meta = meta  # to re-create the stream if Redis lost it
        self.base = base  # the seq of events[0]
        self.events: list[bytes] = []
        self.sent = base - 1  # highest seq handed to a flush round
        self.stored = base - 1  # highest seq Redis acknowledged
        self.terminal = False
        self.error: JournalError | None = None
        self.outage_since: float | None = None
        self.verify = False  # send an append even with nothing new: is Redis still whole?
        self.finished_at = 0.0  # when its terminal event was stored

    @property
    def next_seq(self) -> int:
        return self.base + len(self.events)

    def unsent(self) -> tuple[int, list[bytes]]:
        """The first unsent seq and the events from it on; marks them sent."""
        first = self.sent + 1
        self.sent = self.next_seq - 1
        return first, self.events[first - self.base :]

    def resend_after(self, seq: int) -> None:
        """Redis holds events up to ``seq`` (and not one more): send the rest again."""
        self.sent = self.stored = seq


class RedisJournal(Journal):
    """Streams in Redis; ``control`` is the ``RedisControlPlane`` over the same client.

    ``outage``: seconds Redis may stay unreachable (or answer without a stream it lost)
    before producers and readers give up on a stream; until then producers keep its events
    and append what Redis lacks once it answers, and readers retry from their position.
    """

    control: RedisControlPlane

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 600.0,
        max_finished: int = 10_000,
        tombstone_ttl: float = 86_400.0,
        heartbeat: float = 1.0,
        liveness: float = 3.0,
        prefix: str = "tw:",
        read_batch: int = 512,
        outage: float = 30.0,
    ) -> None:
        self.client = RedisClient(url, prefix=prefix)
        self.control = RedisControlPlane(
            self.client,
            ttl=ttl,
            tombstone_ttl=tombstone_ttl,
            heartbeat=heartbeat,
            liveness=liveness,
        )
        self.url = url
        self.ttl = ttl
        self.max_finished = int(max_finished)
        self.tombstone_ttl = tombstone_ttl
        self.heartbeat = heartbeat
        self.prefix = prefix
        self.read_batch = read_batch
        self.outage = outage
        self._producing: dict[str, _Producing] = {}
        self._dirty: dict[str, _Producing] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._round: asyncio.Future[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        #: Finished streams kept for ``outage`` s: a failover may lose what Redis acknowledged.
        self._lingering: dict[str, _Producing] = {}
        self.control.on_recovered = self.verify_after_trouble

    @property
    def _redis(self) -> Any:
        return self.client.redis

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._retention is None:
            self._retention = asyncio.create_task(
                self._retention_loop(), name="tokenwire-redis-retention"
            )

    async def close(self) -> None:
        if self._flusher is not None:
            # Bounded: through an outage, what is not stored by now is lost with us.
            await asyncio.wait([self._flusher], timeout=min(self.outage, 10.0))
            self._flusher.cancel()
        if self._retention is not None:
            self._retention.cancel()
            await asyncio.wait([self._retention], timeout=5.0)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self._replicated()
        await self.control.close()
        await self.client.close()

    async def _replicated(self) -> None:
        """Wait until a replica has everything the master has (when it has replicas).

        After this process exits nobody holds its streams' events any more, so a failover
        right after a rolling restart would lose what the master had not replicated yet.
        (``WAIT`` covers one connection's writes only; the offsets cover all of them.)"""
        info = await self._redis.info("replication")
        if not info.get("connected_slaves"):
            return
        target = int(info["master_repl_offset"])
        while True:
            replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            if any(int(r.get("offset", 0)) >= target for r in replicas):
                return
            await asyncio.sleep(0.02)
            info = await self._redis.info("replication")

    # -- producing ---------------------------------------------------------------------

    async def create(self, meta: StreamMeta) -> None:
        """Store the stream's metadata; ``control.produce(meta.id)`` comes first."""
        await self.start()
        encoded = encode_json(meta.to_dict())
        with translated("creating a stream"):
            await self._redis.hset(self.client.keys(meta.id).meta, "meta", encoded)
        self._producing[meta.id] = _Producing(encoded)

    def resume_producing(self, stream_id: str, next_seq: int, meta: StreamMeta) -> None:
        """Append to ``stream_id`` from ``next_seq`` on (after ``control.claim``)."""
        self._producing[stream_id] = _Producing(encode_json(meta.to_dict()), next_seq)

    async def append(self, stream_id: str, event: Event) -> int:
        state = self._producing.get(stream_id)
        if state is None:
            raise JournalError(f"Redis journal: stream '{stream_id}' is not produced here.")
        if state.error is not None:
            raise state.error
        if state.terminal:
            raise JournalError(f"Redis journal: stream '{stream_id}' already ended.")
        seq = event.seq = state.next_seq
        state.events.append(encode(event))
        state.terminal = event.terminal
        self._dirty[stream_id] = state
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="tokenwire-redis-flush")
        if event.terminal or seq - state.stored > _MAX_PENDING:
            await self._stored(state, seq)
        return seq

    async def _stored(self, state: _Producing, seq: int) -> None:
        while state.stored < seq and state.error is None:
            if self._round is None:
                self._round = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._round)
        if state.error is not None:
            raise state.error

    async def _flush_loop(self) -> None:
        """Group commit: everything queued since the last round goes in one pipeline.
        Through an outage, rounds repeat with a growing pause until Redis answers."""
        delay = 0.05
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            round_done, self._round = self._round, None
            trouble = await self._flush_round(dirty)
            if round_done is not None and not round_done.done():
                round_done.set_result(None)
            if trouble:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            if delay > 0.05:  # Redis answers again after trouble: is it whole?
                self.verify_after_trouble()
            delay = 0.05
            await asyncio.sleep(0)  # let more tokens queue up behind this round
        if self._round is not None and not self._round.done():
            self._round.set_result(None)
            self._round = None

    async def _flush_round(self, dirty: dict[str, _Producing]) -> bool:
        """One pipeline for every dirty stream; True if Redis was in trouble."""
        batch: list[tuple[str, _Producing, int]] = []
        calls: list[tuple[list[str], list[Any]]] = []
        now = repr(time.time())
        for stream_id, state in dirty.items():
            first, payloads = state.unsent()
            if not payloads and not state.verify:
                continue
            state.verify = False
            args: list[Any] = [
                first,  # the entry number before the first payload's (seq n: entry n + 1)
                int(state.terminal),
                int(self.ttl * 1000),
                int((self.ttl + self.tombstone_ttl) * 1000),
                stream_id,
                now,
                self.client.node,
                *payloads,
            ]
            calls.append((list(self.client.keys(stream_id)), args))
            batch.append((stream_id, state, first + len(payloads) - 1))
        results = await self.client.run_many(APPEND, calls)
        trouble = False
        for (stream_id, state, last), result in zip(batch, results, strict=True):
            if not isinstance(result, BaseException) or self._still_done(state, result):
                state.stored = max(state.stored, last)
                state.outage_since = None
                if state.terminal and state.stored == state.next_seq - 1:
                    self._finished(stream_id, state)
            elif await self._recover(stream_id, state, result):
                trouble = True
        return trouble

    def _finished(self, stream_id: str, state: _Producing) -> None:
        self._producing.pop(stream_id, None)
        if state.error is None:
            state.finished_at = time.monotonic()
            self._lingering[stream_id] = state

    @staticmethod
    def _still_done(state: _Producing, result: BaseException) -> bool:
        """A finished stream re-sent to verify it (``verify_after_trouble``) is refused as
        ended: then Redis still has it, terminal event included."""
        return (
            state.finished_at > 0
            and isinstance(result, ResponseError)
            and str(result).startswith("TWDONE")
        )

    def verify_after_trouble(self) -> None:
        """Redis was unreachable or failed over: it may have lost what it acknowledged
        (asynchronous replication). Check every stream produced here, and every one that
        finished within ``outage`` s, and append again whatever Redis lacks."""
        now = time.monotonic()
        for stream_id, state in list(self._lingering.items()):
            if now - state.finished_at > self.outage:
                del self._lingering[stream_id]
        for stream_id, state in [*self._producing.items(), *self._lingering.items()]:
            if state.error is None:
                state.verify = True
                state.resend_after(state.stored)
                self._dirty[stream_id] = state
        if self._dirty and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_loop(), name="tokenwire-redis-flush")

    async def _recover(self, stream_id: str, state: _Producing, error: BaseException) -> bool:
        """Handle a refused or failed append; True if it is to be retried after a pause."""
        message = str(error)
        if isinstance(error, ResponseError) and message.startswith("TWGAP"):
            # Redis lost the tail of the stream (a failover before it replicated).
            held = int(message.split()[1])  # entries 0-1 … 0-held: seqs up to held - 1
            if held - 1 >= state.base - 1:
                state.resend_after(held - 1)
                self._dirty[stream_id] = state
                return False
        elif isinstance(error, ResponseError) and message.startswith("TWLOST"):
            # Redis lost the whole stream (restarted empty): re-create it, append it all.
            if state.meta is not None and state.base == 0 and await self._restore(stream_id, state):
                state.resend_after(-1)
                self._dirty[stream_id] = state
                return False
            return self._outage(stream_id, state)
        elif not (isinstance(error, ResponseError) and message.startswith(("TWOWNER", "TWDONE"))):
            return self._outage(stream_id, state)
        state.error = self._append_error(stream_id, error)
        self._producing.pop(stream_id, None)
        log.warning("stream %s: %s", stream_id, state.error)
        return False

    def _outage(self, stream_id: str, state: _Producing) -> bool:
        """Redis unreachable: keep the events and retry; after ``outage`` seconds end the
        stream with a failure after what it produced, and go on trying to store that (the
        partial output) until its TTL passes."""
        now = time.monotonic()
        if state.outage_since is None:
            state.outage_since = now
            log.warning("stream %s: Redis unreachable; keeping its events", stream_id)
        if state.error is None and now - state.outage_since > self.outage:
            failed = _journal_unavailable(self.outage)
            if not state.terminal:
                state.events.append(encode(failed))
                state.terminal = True
            state.error = JournalError(failed.error["message"], code="journal_unavailable")
            state.outage_since = now
        elif state.error is not None and now - state.outage_since > self.ttl:
            self._producing.pop(stream_id, None)
            return True
        state.resend_after(state.stored)
        self._dirty[stream_id] = state
        return True

    async def _restore(self, stream_id: str, state: _Producing) -> bool:
        keys = self.client.keys(stream_id)
        args = [state.meta, self.client.node, stream_id, int(self.control.liveness * 1000)]
        try:
            await self.client.eval(
                RESTORE,
                [keys.meta, keys.gone, keys.active, self.client.node_key(self.client.node)],
                args,
            )
        except (RedisError, OSError):
            return False  # unreachable, or TWDONE: it ended meanwhile
        log.warning("stream %s was missing from Redis; appending it again", stream_id)
        return True

    @staticmethod
    def _append_error(stream_id: str, result: BaseException) -> JournalError:
        if isinstance(result, ResponseError) and str(result).startswith("TWOWNER"):
            return StreamHandedOver(
                f"Redis journal: stream '{stream_id}' is produced by another replica now."
            )
        return JournalError(f"Redis journal: appending to '{stream_id}' failed: {result}")

    async def _patiently(self, action: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """A read-side operation, retried while Redis is unreachable (a restart, a failover)
        for up to ``outage`` seconds, so a resume during an outage waits rather than fails;
        then its ``JournalError``. ``StreamNotFound`` / ``StreamExpired`` pass at once."""
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                with translated(action):
                    return await guarded(operation())
            except JournalError:
                if time.monotonic() - started > self.outage:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)

    async def meta(self, stream_id: str) -> StreamMeta:
        meta_key = self.client.keys(stream_id).meta
        raw = await self._patiently(
            "reading stream metadata", lambda: self._redis.hget(meta_key, "meta")
        )
        if raw is None:
            await self._patiently("reading stream metadata", lambda: self._raise_missing(stream_id))
        return StreamMeta.from_dict(orjson.loads(raw))

    async def snapshot(self, stream_id: str) -> list[Event]:
        keys = self.client.keys(stream_id)
        with translated("reading a stream"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(keys.meta)
                pipe.xrange(keys.events, "-", "+")
                exists, entries = await guarded(pipe.execute())
            if not exists:
                await guarded(self._raise_missing(stream_id))
        return [decode(entry_id, fields) for entry_id, fields in entries]

    async def delete(self, stream_id: str) -> None:
        keys = self.client.keys(stream_id)
        self._lingering.pop(stream_id, None)  # or a re-check after trouble would restore it
        with translated("deleting a stream"):
            async with self._redis.pipeline(transaction=True) as pipe:
                # A deleted id answers 404 (never existed), not 410; its tombstone says so,
                # and keeps a producer re-checking after Redis trouble from restoring it.
                pipe.delete(keys.events, keys.meta, keys.readers)
                pipe.set(keys.gone, b"deleted", px=int(self.tombstone_ttl * 1000))
                pipe.zrem(keys.finished, stream_id)
                await guarded(pipe.execute())

    async def _raise_missing(self, stream_id: str) -> None:
        if await self._redis.get(self.client.keys(stream_id).gone) not in (None, b"deleted"):
            raise StreamExpired(
                f"Stream '{stream_id}' has expired: finished streams are kept for {self.ttl:g}s."
            )
        raise StreamNotFound(f"No stream with id '{stream_id}'.")

    async def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Replay then follow. While Redis is unreachable, or answers without the stream (it
        lost it; the producer appends it again), the reader retries from its position for
        a little longer than ``outage`` seconds; past that it ends with a ``stream.failed``
        (``journal_unavailable``) of its own, so its client still gets a terminal event."""
        keys = self.client.keys(stream_id)
        exists, done_flag = await self._patiently(
            "opening a stream", lambda: self._redis.hmget(keys.meta, ["meta", "done"])
        )
        if exists is None:
            await self._patiently("opening a stream", lambda: self._raise_missing(stream_id))
        done = done_flag is not None
        lease = _Lease(secrets.token_hex(6))
        last = max(after, -1)
        trouble: float | None = None
        try:
            while True:
                state: int | None = ProducerState.ALIVE
                try:
                    entries = await self._next_entries(stream_id, keys.events, lease, last, done)
                    if not entries and not done:
                        # Quiet for a heartbeat: make sure someone still produces it.
                        state = await self.control.end_if_orphaned(stream_id)
                        if state > 0:  # it was orphaned, and this call ended it
                            state = ProducerState.ENDED
                except JournalError:
                    entries, state = [], None
                for entry_id, fields in entries:
                    event = decode(entry_id, fields)
                    last = event.seq
                    yield event
                    if event.terminal:
                        return
                if done and state is not None and not entries:
                    return  # resumed after the terminal event: nothing more will come
                if entries or state in (ProducerState.ALIVE, ProducerState.ENDED):
                    done = done or state == ProducerState.ENDED
                    trouble = None
                    continue
                if state == ProducerState.MISSING:
                    with translated("opening a stream"):
                        await guarded(self._raise_if_expired(stream_id))
                trouble = trouble or time.monotonic()
                # Longer than the producer's bound: a producer that gives up stores its own
                # end once Redis is back, and a reader still waiting then reads that one.
                if time.monotonic() - trouble > self.outage + _READER_MARGIN:
                    failed = _journal_unavailable(self.outage)
                    failed.seq = last + 1
                    yield failed
                    return
                lease.until = 0.0  # hold presence again as soon as Redis answers
                await asyncio.sleep(min(0.1 * 2 ** int(time.monotonic() - trouble), _MAX_BACKOFF))
        finally:
            self.control.reader_left(stream_id, lease.reader)

    async def _next_entries(
        self, stream_id: str, events_key: str, lease: _Lease, last: int, done: bool
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The entries after ``last`` (waiting up to a heartbeat for some unless ``done``),
        holding the reader's presence lease first if it is due."""
        now = time.time()
        if now + self.heartbeat >= lease.until:
            lease.until = now + 3 * self.heartbeat
            await self.control.hold_presence(stream_id, lease.reader, lease.until)
        with translated("reading a stream"):
            response = await guarded(
                self._redis.xread(
                    {events_key: f"0-{last + 1}"},
                    count=self.read_batch,
                    block=None if done else max(1, int(self.heartbeat * 1000)),
                )
            )
        return response[0][1] if response else []

    async def _raise_if_expired(self, stream_id: str) -> None:
        if await self._redis.exists(self.client.keys(stream_id).gone):
            await self._raise_missing(stream_id)
            raise StreamNotFound(f"No stream with id '{stream_id}'.")  # deleted

    # -- retention -----------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.control.liveness)
            now = time.monotonic()
            for stream_id, state in list(self._lingering.items()):
                if now - state.finished_at > self.outage:
                    del self._lingering[stream_id]
            try:
                await self._evict_finished()
            except (RedisError, OSError) as exc:
                log.warning("Redis retention sweep failed: %s", exc)

    async def _evict_finished(self) -> None:
        """Keep finished streams within ``ttl`` and ``max_finished``, oldest out first."""
        finished_key = f"{self.prefix}finished"
        await self._redis.zremrangebyscore(finished_key, "-inf", time.time() - self.ttl)
        excess = await self._redis.zcard(finished_key) - self.max_finished
        if excess > 0:
            oldest = await self._redis.zpopmin(finished_key, excess)
            async with self._redis.pipeline(transaction=False) as pipe:
                for raw_id, _ in oldest:
                    keys = self.client.keys(raw_id.decode())
                    pipe.delete(keys.events, keys.meta, keys.readers)
                    pipe.set(keys.gone, b"1", px=int(self.tombstone_ttl * 1000))
                await pipe.execute()

    def stats(self) -> dict[str, int]:
        return {"streams": len(self._producing)}
