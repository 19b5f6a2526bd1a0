"""The Redis journal: many replicas share streams, Stop and producer liveness.

Any replica can serve a resume (events live in Redis Streams), a cancel on any replica reaches
the producing one (pub/sub, with a flag in the stream's hash as a fallback the producer polls),
and when a producing replica dies its readers get a terminal ``stream.failed`` within seconds.

Keys (``prefix`` defaults to ``tw:``; ``{id}`` is a hash tag keeping one stream's keys together):

- ``tw:{id}:events``  Redis Stream. The event with seq n has the explicit entry id ``0-(n+1)``,
  so "after seq n" is ``XREAD`` from ``0-(n+1)``: replay and live are one read, and there is
  no seam to lose or repeat an event at.
- ``tw:{id}:meta``    hash: ``meta`` (StreamMeta JSON), ``producer`` (node id), ``done`` (set
  with the terminal event, after which nothing may be appended), ``cancel`` (a pending Stop).
- ``tw:{id}:readers`` sorted set, reader id -> wall time it is known connected until; lets the
  producer's disconnect timer see readers attached to other replicas.
- ``tw:{id}:gone``    tombstone written with the terminal event that outlives the stream by
  ``tombstone_ttl``: an expired id answers 410, an id never seen 404.
- ``tw:node:{node}``  producer heartbeat, refreshed every ``heartbeat`` s, expiring after
  ``liveness`` s.
- ``tw:active``       hash stream id -> producing node (the dead-producer sweep walks it).
- ``tw:finished``     sorted set stream id -> finish time (the ``max_finished`` bound).
- channel ``tw:cancel``: ``"<id> <reason>"``; every replica listens, cancels what it produces.

Promises beyond ``Journal``'s:
- Appends are group-committed. ``append`` numbers the event and queues it; one flusher task
  writes whatever is queued, for all streams, in one pipeline (one Lua call per stream), so a
  token costs a list append on the producer and a share of one round trip. The terminal
  event's ``append`` returns only once everything before it is stored.
- A stream whose producer stopped heartbeating is ended with ``stream.failed`` (code
  ``producer_lost``) by whichever reader or replica notices first, atomically (Lua), within
  about ``liveness + heartbeat`` seconds; its partial output stays readable.
- redis-py exceptions surface as ``JournalError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from tokenwire.errors import JournalError, StreamExpired, StreamNotFound
from tokenwire.events import Event, StreamFailed, event_from_dict
from tokenwire.journal.base import Journal, StreamMeta

__all__ = ["RedisJournal"]

log = logging.getLogger("tokenwire.journal.redis")

# KEYS: events, meta, gone, active, finished, readers
# ARGV: first_seq, terminal (0|1), ttl_ms, gone_ttl_ms, stream_id, now, payload...
_APPEND = """
if redis.call('HEXISTS', KEYS[2], 'done') == 1 then
  return redis.error_reply('TWDONE the stream already has its terminal event')
end
local seq = tonumber(ARGV[1])
for i = 7, #ARGV do
  seq = seq + 1
  redis.call('XADD', KEYS[1], '0-' .. string.format('%d', seq), 'e', ARGV[i])
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'done', '1')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[6], ARGV[3])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  redis.call('HDEL', KEYS[4], ARGV[5])
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
end
return seq
"""

# Ends a stream whose producer no longer heartbeats. Returns -1: no such stream, -2: it has
# ended already, 0: its producer is alive, n > 0: wrote the failed event with entry id 0-n.
# KEYS: events, meta, gone, active, finished, readers
# ARGV: node key prefix, payload, ttl_ms, gone_ttl_ms, stream_id, now
_FINALIZE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[2], 'done') == 1 then return -2 end
local node = redis.call('HGET', KEYS[2], 'producer')
if node and redis.call('EXISTS', ARGV[1] .. node) == 1 then return 0 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local n = 1
if #last > 0 then n = tonumber(string.match(last[1][1], '%-(%d+)$')) + 1 end
redis.call('XADD', KEYS[1], '0-' .. string.format('%d', n), 'e', ARGV[2])
redis.call('HSET', KEYS[2], 'done', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[6], ARGV[3])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
return n
"""

#: Seconds a reader keeps retrying while Redis is unreachable before it gives up.
_READ_RETRY_WINDOW = 15.0

#: Events a stream may have queued before ``append`` waits for Redis (backpressure).
_MAX_PENDING = 1024


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """redis-py errors become ``JournalError`` here, at the module's edge."""
    try:
        yield
    except RedisError as exc:
        raise JournalError(f"Redis journal: {action} failed: {exc}") from exc


_T = TypeVar("_T")


async def _guarded(operation: Awaitable[_T]) -> _T:
    """Run one Redis operation in a task of its own and cancel only the wait for it.

    redis-py's asyncio client can absorb a CancelledError that lands mid-command (measured:
    a large share of cancels were lost), so a reader whose client left would read on for
    ever. Here the operation finishes on its own and the caller sees the cancellation.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_retrieve)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


def _encode(event: Event) -> bytes:
    data = event.to_dict()
    del data["seq"]  # the entry id carries it
    return orjson.dumps(data)


def _decode(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    data = orjson.loads(fields[b"e"])
    data["seq"] = int(entry_id.rsplit(b"-", 1)[1]) - 1
    return event_from_dict(data)


class _Producing:
    """A stream this process appends to."""

    __slots__ = ("error", "next_seq", "pending", "stored", "terminal")

    def __init__(self) -> None:
        self.next_seq = 0
        self.pending: list[bytes] = []
        self.terminal = False
        self.stored = -1  # highest seq known to be in Redis
        self.error: JournalError | None = None


class RedisJournal(Journal):
    shared = True

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
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.max_finished = int(max_finished)
        self.tombstone_ttl = tombstone_ttl
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.prefix = prefix
        self.read_batch = read_batch
        self.node = secrets.token_hex(8)
        # Typed as Any: redis-py's stubs return unions of every RESP decoding per command.
        self._redis: Any = aioredis.Redis.from_url(url, socket_connect_timeout=5.0)
        self._append_script = self._redis.register_script(_APPEND)
        self._finalize_script = self._redis.register_script(_FINALIZE)
        self._producing: dict[str, _Producing] = {}
        self._dirty: dict[str, _Producing] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._round: asyncio.Future[None] | None = None
        self._cancels: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._cancel_seen: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._started = False
        self._closing = asyncio.Event()

    # -- keys --------------------------------------------------------------------------

    def _keys(self, stream_id: str) -> list[str]:
        p = self.prefix
        base = f"{p}{{{stream_id}}}"
        return [
            f"{base}:events",
            f"{base}:meta",
            f"{base}:gone",
            f"{p}active",
            f"{p}finished",
            f"{base}:readers",
        ]

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    @property
    def _channel(self) -> str:
        return f"{self.prefix}cancel"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._beat()
        self._background = [
            asyncio.create_task(self._heartbeat_loop(), name="tokenwire-redis-heartbeat"),
            asyncio.create_task(self._cancel_listener(), name="tokenwire-redis-cancels"),
        ]

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        self._closing.set()
        tasks = [*self._background, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            # redis-py may turn a cancellation inside a read into a ConnectionError, which
            # the loops retry; _closing stops them, and the wait is bounded regardless.
            await asyncio.wait(tasks, timeout=5.0)
        if self._started:
            with contextlib.suppress(RedisError):
                # Readers of anything still open learn at once that no one produces it.
                await self._redis.delete(self._node_key(self.node))
        with contextlib.suppress(RedisError):
            await self._redis.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- producing ---------------------------------------------------------------------

    async def create(self, meta: StreamMeta) -> None:
        await self.start()
        meta_key = self._keys(meta.id)[1]
        with _translated("creating a stream"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    meta_key, mapping={"meta": orjson.dumps(meta.to_dict()), "producer": self.node}
                )
                pipe.hset(f"{self.prefix}active", meta.id, self.node)
                await pipe.execute()
        self._producing[meta.id] = _Producing()

    async def append(self, stream_id: str, event: Event) -> int:
        state = self._producing.get(stream_id)
        if state is None:
            raise JournalError(f"Redis journal: stream '{stream_id}' is not produced here.")
        if state.error is not None:
            raise state.error
        if state.terminal:
            raise JournalError(f"Redis journal: stream '{stream_id}' already ended.")
        seq = event.seq = state.next_seq
        state.next_seq += 1
        state.pending.append(_encode(event))
        state.terminal = event.terminal
        self._dirty[stream_id] = state
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="tokenwire-redis-flush")
        if event.terminal or len(state.pending) > _MAX_PENDING:
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
        """Group commit: everything queued since the last round goes in one pipeline."""
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            round_done, self._round = self._round, None
            batch: list[tuple[str, _Producing, int, bool]] = []
            calls: list[tuple[list[str], list[Any]]] = []
            now = repr(time.time())
            for stream_id, state in dirty.items():
                payloads, state.pending = state.pending, []
                if not payloads:
                    continue
                first = state.next_seq - len(payloads)
                terminal = state.terminal
                args: list[Any] = [
                    first,
                    int(terminal),
                    int(self.ttl * 1000),
                    int((self.ttl + self.tombstone_ttl) * 1000),
                    stream_id,
                    now,
                    *payloads,
                ]
                calls.append((self._keys(stream_id), args))
                batch.append((stream_id, state, first + len(payloads) - 1, terminal))
            results = await self._run_appends(calls)
            for (stream_id, state, last, terminal), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    state.error = JournalError(
                        f"Redis journal: appending to '{stream_id}' failed: {result}"
                    )
                    self._producing.pop(stream_id, None)
                    self._spawn(self._end_after_failure(stream_id))
                else:
                    state.stored = last
                    if terminal:
                        self._producing.pop(stream_id, None)
            if round_done is not None and not round_done.done():
                round_done.set_result(None)
            await asyncio.sleep(0)  # let more tokens queue up behind this round
        if self._round is not None and not self._round.done():
            self._round.set_result(None)
            self._round = None

    async def _run_appends(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One pipeline of EVALSHA calls; results or exceptions, one per call.

        Plain EVALSHA rather than redis-py's Script objects: those send SCRIPT EXISTS before
        every pipeline, doubling the round trips. NOSCRIPT (a restarted or flushed Redis)
        loads the script and retries the calls it refused, which did not run.
        """
        sha = self._append_script.sha
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            try:
                if len(pending) == 1:
                    # The common case while tokens trickle in: skip the pipeline machinery.
                    keys, args = calls[pending[0]]
                    try:
                        answers = [await self._redis.evalsha(sha, len(keys), *keys, *args)]
                    except ResponseError as exc:
                        answers = [exc]
                else:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for index in pending:
                            keys, args = calls[index]
                            pipe.evalsha(sha, len(keys), *keys, *args)
                        answers = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                for index in pending:
                    results[index] = exc
                return results
            refused = []
            for index, answer in zip(pending, answers, strict=True):
                results[index] = answer
                if isinstance(answer, NoScriptError):
                    refused.append(index)
            if not refused or attempt:
                break
            try:
                sha = self._append_script.sha = await self._redis.script_load(_APPEND)
            except (RedisError, OSError) as exc:
                for index in refused:
                    results[index] = exc
                break
            pending = refused
        return results

    # -- reading -----------------------------------------------------------------------

    async def meta(self, stream_id: str) -> StreamMeta:
        meta_key = self._keys(stream_id)[1]
        with _translated("reading stream metadata"):
            raw = await _guarded(self._redis.hget(meta_key, "meta"))
            if raw is None:
                await _guarded(self._raise_missing(stream_id))
        return StreamMeta.from_dict(orjson.loads(raw))

    async def snapshot(self, stream_id: str) -> list[Event]:
        events_key, meta_key = self._keys(stream_id)[:2]
        with _translated("reading a stream"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(meta_key)
                pipe.xrange(events_key, "-", "+")
                exists, entries = await _guarded(pipe.execute())
            if not exists:
                await _guarded(self._raise_missing(stream_id))
        return [_decode(entry_id, fields) for entry_id, fields in entries]

    async def delete(self, stream_id: str) -> None:
        events_key, meta_key, gone_key, _, finished_key, readers_key = self._keys(stream_id)
        with _translated("deleting a stream"):
            async with self._redis.pipeline(transaction=True) as pipe:
                # The tombstone too: a deleted id answers 404 (never existed), not 410.
                pipe.delete(events_key, meta_key, gone_key, readers_key)
                pipe.zrem(finished_key, stream_id)
                await _guarded(pipe.execute())

    async def _raise_missing(self, stream_id: str) -> None:
        gone = self._keys(stream_id)[2]
        if await self._redis.exists(gone):
            raise StreamExpired(
                f"Stream '{stream_id}' has expired: finished streams are kept for {self.ttl:g}s."
            )
        raise StreamNotFound(f"No stream with id '{stream_id}'.")

    async def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        keys = self._keys(stream_id)
        events_key, meta_key, *_, readers_key = keys
        with _translated("opening a stream"):
            exists, done_flag = await _guarded(self._redis.hmget(meta_key, ["meta", "done"]))
            if exists is None:
                await _guarded(self._raise_missing(stream_id))
        done = done_flag is not None
        reader = secrets.token_hex(6)
        last = max(after, -1)
        block_ms = max(1, int(self.heartbeat * 1000))
        present_until = 0.0
        failing_since: float | None = None
        try:
            while True:
                try:
                    with _translated("reading a stream"):
                        now = time.time()
                        if now + self.heartbeat >= present_until:
                            present_until = now + 3 * self.heartbeat
                            await _guarded(self._hold_presence(readers_key, reader, present_until))
                        response = await _guarded(
                            self._redis.xread(
                                {events_key: f"0-{last + 1}"},
                                count=self.read_batch,
                                block=None if done else block_ms,
                            )
                        )
                except JournalError:
                    # Redis restarting or a connection dropped: the reader knows its
                    # position, so it retries for a while rather than break the client's
                    # stream; the stream's own end (failed, if events were lost) follows.
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > _READ_RETRY_WINDOW:
                        raise
                    present_until = 0.0
                    await asyncio.sleep(min(0.1 * 2 ** int(time.monotonic() - failing_since), 1.0))
                    continue
                failing_since = None
                if response:
                    for entry_id, fields in response[0][1]:
                        event = _decode(entry_id, fields)
                        last = event.seq
                        yield event
                        if event.terminal:
                            return
                    continue
                if done:
                    return  # resumed after the terminal event: nothing more will come
                # Quiet for a heartbeat: make sure someone still produces this stream.
                state = await _guarded(self._finalize_if_orphaned(stream_id))
                if state == -1:
                    with _translated("opening a stream"):
                        await _guarded(self._raise_missing(stream_id))
                done = state == -2
        finally:
            # Leaving is recorded as "present until now"; never awaited here, because a
            # cancelled reader may not await in its finally block.
            self._spawn(self._mark_left(readers_key, reader))

    async def _hold_presence(self, readers_key: str, reader: str, until: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(readers_key, {reader: until})
            pipe.expire(readers_key, int(self.ttl + 3600))
            await pipe.execute()

    async def _mark_left(self, readers_key: str, reader: str) -> None:
        with contextlib.suppress(RedisError):
            await self._redis.zadd(readers_key, {reader: time.time()}, xx=True)

    async def _finalize_if_orphaned(self, stream_id: str) -> int:
        failed = StreamFailed(
            error={
                "type": "producer_lost",
                "message": (
                    "The replica producing this stream stopped (no heartbeat for "
                    f"{self.liveness:g}s); the partial output above is all there is."
                ),
                "code": "producer_lost",
            }
        )
        args: list[Any] = [
            self._node_key(""),
            _encode(failed),
            int(self.ttl * 1000),
            int((self.ttl + self.tombstone_ttl) * 1000),
            stream_id,
            repr(time.time()),
        ]
        with _translated("checking the producer"):
            result = await self._finalize_script(keys=self._keys(stream_id), args=args)
        if int(result) > 0:
            log.warning("stream %s lost its producer; ended it as failed", stream_id)
        return int(result)

    async def _end_after_failure(self, stream_id: str) -> None:
        """A failed append (Redis restarting, unreachable) leaves a stream without its
        terminal event while this producer still heartbeats, so no one else would end it.
        Once Redis answers again, end it with ``stream.failed`` (code ``journal_unavailable``)
        after the events it stored; the Lua script writes it only if none ended it first."""
        failed = StreamFailed(
            error={
                "type": "journal_error",
                "message": "The journal lost events of this stream (Redis was unavailable); "
                "the output above is all that was stored.",
                "code": "journal_unavailable",
            }
        )
        delay = 0.1
        deadline = time.monotonic() + self.ttl
        while time.monotonic() < deadline:
            args: list[Any] = [
                f"{self.prefix}node-none:",  # no such node key: end it whoever produces it
                _encode(failed),
                int(self.ttl * 1000),
                int((self.ttl + self.tombstone_ttl) * 1000),
                stream_id,
                repr(time.time()),
            ]
            try:
                await self._finalize_script(keys=self._keys(stream_id), args=args)
                return
            except (RedisError, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def reader_seen(self, stream_id: str) -> float | None:
        readers_key = self._keys(stream_id)[5]
        with _translated("reading stream readers"):
            top = await _guarded(self._redis.zrevrange(readers_key, 0, 0, withscores=True))
        if not top:
            return None
        return float(top[0][1])

    # -- cancel ------------------------------------------------------------------------

    async def signal_cancel(self, stream_id: str, reason: str) -> None:
        meta_key = self._keys(stream_id)[1]
        with _translated("sending a cancel"):
            await _guarded(self._send_cancel(meta_key, stream_id, reason))

    async def _send_cancel(self, meta_key: str, stream_id: str, reason: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            # The flag outlives a missed pub/sub message: producers poll it each beat.
            pipe.hsetnx(meta_key, "cancel", reason)
            pipe.publish(self._channel, f"{stream_id} {reason}")
            await pipe.execute()

    def cancel_requests(self) -> AsyncIterator[tuple[str, str]]:
        return self._cancel_stream()

    async def _cancel_stream(self) -> AsyncIterator[tuple[str, str]]:
        while True:
            yield await self._cancels.get()

    def _deliver_cancel(self, stream_id: str, reason: str) -> None:
        if stream_id in self._producing and stream_id not in self._cancel_seen:
            self._cancel_seen.add(stream_id)
            self._cancels.put_nowait((stream_id, reason))

    async def _cancel_listener(self) -> None:
        while not self._closing.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    stream_id, _, reason = message["data"].decode().partition(" ")
                    self._deliver_cancel(stream_id, reason or "stop")
            except (RedisError, OSError) as exc:
                if self._closing.is_set():
                    return
                log.warning("Redis cancel channel lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # -- heartbeat, sweeps ---------------------------------------------------------------

    async def _beat(self) -> None:
        with _translated("heartbeat"):
            await self._redis.set(self._node_key(self.node), b"1", px=int(self.liveness * 1000))

    async def _heartbeat_loop(self) -> None:
        last_sweep = 0.0
        while not self._closing.is_set():
            await asyncio.sleep(self.heartbeat)
            try:
                await self._beat()
                await self._poll_cancel_flags()
                if time.monotonic() - last_sweep >= self.liveness:
                    last_sweep = time.monotonic()
                    await self._sweep()
            except (JournalError, RedisError, OSError) as exc:
                log.warning("Redis journal heartbeat failed: %s", exc)
            self._cancel_seen.intersection_update(self._producing)

    async def _poll_cancel_flags(self) -> None:
        ids = [i for i in self._producing if i not in self._cancel_seen]
        if not ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream_id in ids:
                pipe.hget(self._keys(stream_id)[1], "cancel")
            reasons = await pipe.execute()
        for stream_id, reason in zip(ids, reasons, strict=True):
            if reason is not None:
                self._deliver_cancel(stream_id, reason.decode())

    async def _sweep(self) -> None:
        """End streams of dead producers nobody reads; keep finished streams within bounds."""
        active: dict[bytes, bytes] = await self._redis.hgetall(f"{self.prefix}active")
        nodes = sorted({node for node in active.values()})
        if nodes:
            alive = await self._redis.mget([self._node_key(n.decode()) for n in nodes])
            dead = {n for n, beat in zip(nodes, alive, strict=True) if beat is None}
            for stream_id, node in active.items():
                if node in dead:
                    with contextlib.suppress(JournalError):
                        if await self._finalize_if_orphaned(stream_id.decode()) < 0:
                            await self._redis.hdel(f"{self.prefix}active", stream_id)
        finished_key = f"{self.prefix}finished"
        await self._redis.zremrangebyscore(finished_key, "-inf", time.time() - self.ttl)
        excess = await self._redis.zcard(finished_key) - self.max_finished
        if excess > 0:
            oldest = await self._redis.zpopmin(finished_key, excess)
            async with self._redis.pipeline(transaction=False) as pipe:
                for raw_id, _ in oldest:
                    events, meta_key, gone, _a, _f, readers = self._keys(raw_id.decode())
                    pipe.delete(events, meta_key, readers)
                    pipe.set(gone, b"1", px=int(self.tombstone_ttl * 1000))
                await pipe.execute()

    def stats(self) -> dict[str, int]:
        return {"streams": len(self._producing)}
