"""The Redis control plane: Stop, reader presence, producer liveness and stream ownership
shared by every replica on one Redis (keys: ``journal/redis/client.py``).

- Cancel bus: a Stop on any replica is published on ``tw:cancel`` and set as a flag in the
  stream's hash, which the producer polls every heartbeat in case the message was missed.
- Presence: each reader holds a lease in ``tw:{id}:readers``, so the producer's disconnect
  timer sees readers attached to other replicas.
- Liveness: this process sets ``tw:node:{node}`` every ``heartbeat`` s, expiring after
  ``liveness`` s. A stream whose producer stopped beating is ended with ``stream.failed``
  ``producer_lost`` by whichever reader or replica notices first, atomically (Lua), once the
  producer has been seen dead twice ``2 × heartbeat`` apart.
- Names: ``tw:name:{name}`` maps a wire's own name for a stream (a chat id) to its id.
- Ownership: ``produce`` records this node as a stream's producer; ``claim`` takes a stream
  whose producer is dead or released it (one Lua script: exactly one claimer wins);
  ``release`` gives one up. The log refuses appends from any node but the producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError

from tokenwire.errors import JournalError
from tokenwire.events import StreamFailed
from tokenwire.journal.control import Claim, ControlPlane, ProducerState
from tokenwire.journal.redis.client import (
    CLAIM,
    FINALIZE,
    RELEASE,
    RedisClient,
    encode,
    guarded,
    translated,
)

__all__ = ["RedisControlPlane"]

log = logging.getLogger("tokenwire.journal.redis")


class RedisControlPlane(ControlPlane):
    shared = True

    def __init__(
        self,
        client: RedisClient,
        *,
        ttl: float = 600.0,
        tombstone_ttl: float = 86_400.0,
        heartbeat: float = 1.0,
        liveness: float = 3.0,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.tombstone_ttl = tombstone_ttl
        self.heartbeat = heartbeat
        self.liveness = liveness
        self._producing: set[str] = set()
        self._cancels: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._cancel_seen: set[str] = set()
        self._background: list[asyncio.Task[None]] = []
        self._started = False
        self._closing = asyncio.Event()
        self._trouble_at = -math.inf  # when Redis last failed the heartbeat
        #: Called when the heartbeat succeeds again after failing (the log re-checks).
        self.on_recovered: Callable[[], None] = lambda: None

    @property
    def node(self) -> str:
        return self.client.node

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            await self._beat()
        except JournalError as exc:
            # A replica starting while Redis fails over or restarts still starts: the
            # heartbeat loop goes on trying, and requests meet the outage handling.
            self._trouble_at = time.monotonic()
            log.warning("Redis unreachable at start (%s); retrying in the background", exc)
        self._background = [
            asyncio.create_task(self._heartbeat_loop(), name="tokenwire-redis-heartbeat"),
            asyncio.create_task(self._cancel_listener(), name="tokenwire-redis-cancels"),
        ]

    async def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        for task in self._background:
            task.cancel()
        if self._background:
            # redis-py may turn a cancellation inside a read into a ConnectionError, which
            # the loops retry; _closing stops them, and the wait is bounded regardless.
            await asyncio.wait(self._background, timeout=5.0)
        if self._started:
            with contextlib.suppress(RedisError, OSError):
                # Readers of anything still open learn at once that no one produces it.
                await self.client.redis.delete(self.client.node_key(self.node))

    # -- ownership and liveness ----------------------------------------------------------

    async def produce(self, stream_id: str) -> None:
        await self.start()
        keys = self.client.keys(stream_id)
        with translated("creating a stream"):
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.meta, "producer", self.node)
                pipe.hset(keys.active, stream_id, self.node)
                await pipe.execute()
        self._producing.add(stream_id)

    def stopped_producing(self, stream_id: str) -> None:
        self._producing.discard(stream_id)

    async def claim(self, stream_id: str) -> Claim | None:
        await self.start()
        keys = self.client.keys(stream_id)
        args = [self.client.node_key(""), self.node, stream_id]
        with translated("claiming a stream"):
            result = await guarded(
                self.client.eval(CLAIM, [keys.events, keys.meta, keys.active], args)
            )
        if int(result[0]) != 1 and not (int(result[0]) == 2 and stream_id not in self._producing):
            return None
        self._producing.add(stream_id)
        previous = result[2].decode() if result[2] else None
        log.warning("claimed stream %s (producer was %s)", stream_id, previous or "released")
        return Claim(stream_id=stream_id, next_seq=int(result[1]), previous=previous)

    async def release(self, stream_id: str) -> None:
        self._producing.discard(stream_id)
        with translated("releasing a stream"):
            keys = self.client.keys(stream_id)
            await self.client.eval(RELEASE, [keys.meta, keys.active], [self.node, stream_id])

    async def end_if_orphaned(self, stream_id: str) -> int:
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
        if self.on_orphan is not None:
            # Takeover first: only once the producer is surely lost, and only if no replica
            # continues the stream, is it ended.
            state = await self._finalize(stream_id, self.client.node_key(""), b"", dry=True)
            if state != ProducerState.LOST:
                return state
            try:
                if await self.on_orphan(stream_id):
                    return ProducerState.ALIVE
            except Exception:
                log.exception("taking stream %s over failed", stream_id)
        result = await self._finalize(stream_id, self.client.node_key(""), encode(failed))
        if result > 0:
            log.warning("stream %s lost its producer; ended it as failed", stream_id)
        return result

    async def _finalize(
        self, stream_id: str, node_prefix: str, payload: bytes, *, dry: bool = False
    ) -> int:
        args: list[Any] = [
            node_prefix,
            payload,
            int(self.ttl * 1000),
            int((self.ttl + self.tombstone_ttl) * 1000),
            stream_id,
            repr(time.time()),
            int(2 * self.heartbeat * 1000),
            int(dry),
        ]
        with translated("checking the producer"):
            result = await guarded(
                self.client.eval(FINALIZE, list(self.client.keys(stream_id)), args)
            )
        return int(result)

    # -- cancel bus ----------------------------------------------------------------------

    async def signal_cancel(self, stream_id: str, reason: str) -> None:
        meta_key = self.client.keys(stream_id).meta
        with translated("sending a cancel"):
            await guarded(self._send_cancel(meta_key, stream_id, reason))

    async def _send_cancel(self, meta_key: str, stream_id: str, reason: str) -> None:
        async with self.client.redis.pipeline(transaction=False) as pipe:
            # The flag outlives a missed pub/sub message: producers poll it each beat.
            pipe.hsetnx(meta_key, "cancel", reason)
            pipe.publish(self.client.cancel_channel, f"{stream_id} {reason}")
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
            pubsub = self.client.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.client.cancel_channel)
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

    # -- reader presence -----------------------------------------------------------------

    async def hold_presence(self, stream_id: str, reader: str, until: float) -> None:
        readers_key = self.client.keys(stream_id).readers
        with translated("holding reader presence"):
            await guarded(self._hold_presence(readers_key, reader, until))

    async def _hold_presence(self, readers_key: str, reader: str, until: float) -> None:
        async with self.client.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(readers_key, {reader: until})
            pipe.expire(readers_key, int(self.ttl + 3600))
            await pipe.execute()

    def reader_left(self, stream_id: str, reader: str) -> None:
        # Recorded as "present until now"; never awaited by the caller, which may be a
        # cancelled reader in its finally block.
        self.client.spawn(self._mark_left(self.client.keys(stream_id).readers, reader))

    async def _mark_left(self, readers_key: str, reader: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.redis.zadd(readers_key, {reader: time.time()}, xx=True)

    # -- names ---------------------------------------------------------------------------

    async def name_stream(self, name: str, stream_id: str) -> None:
        # Outlives the stream's retention by an hour: a name is looked up for its stream's
        # state, which the stream's own keys answer (404/410 once they are gone).
        ttl_ms = int((self.ttl + 3600) * 1000)
        with translated("naming a stream"):
            await guarded(self.client.redis.set(self.client.name_key(name), stream_id, px=ttl_ms))

    async def named_stream(self, name: str) -> str | None:
        with translated("looking a stream's name up"):
            raw = await guarded(self.client.redis.get(self.client.name_key(name)))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def reader_seen(self, stream_id: str) -> float | None:
        readers_key = self.client.keys(stream_id).readers
        with translated("reading stream readers"):
            top = await guarded(self.client.redis.zrevrange(readers_key, 0, 0, withscores=True))
        if time.monotonic() - self._trouble_at < 4 * self.heartbeat:
            # Redis was unreachable just now (and may have restarted empty): readers may
            # not have renewed their leases yet, so count one as present.
            return max(time.time() + self.heartbeat, float(top[0][1]) if top else 0.0)
        if not top:
            return None
        return float(top[0][1])

    # -- heartbeat, sweep ----------------------------------------------------------------

    async def _beat(self) -> bool:
        """Renew this node's liveness key; False if it was missing (Redis lost it — it
        restarted empty or failed over — or this process stalled past ``liveness``)."""
        with translated("heartbeat"):
            previous = await self.client.redis.set(
                self.client.node_key(self.node), b"1", px=int(self.liveness * 1000), get=True
            )
        return previous is not None

    async def _heartbeat_loop(self) -> None:
        last_sweep = 0.0
        last_beat_ok = time.monotonic()
        while not self._closing.is_set():
            await asyncio.sleep(self.heartbeat)
            try:
                intact = await self._beat()
                if not intact or self._trouble_at > last_beat_ok:
                    # Redis is back, or answered without our key (it lost data while
                    # redis-py's own retries hid the outage): the log checks what it lost.
                    self._trouble_at = time.monotonic()
                    self.on_recovered()
                last_beat_ok = time.monotonic()
                await self._poll_cancel_flags()
                if time.monotonic() - last_sweep >= self.liveness:
                    last_sweep = time.monotonic()
                    await self._sweep_dead_producers()
            except (JournalError, RedisError, OSError) as exc:
                self._trouble_at = time.monotonic()
                log.warning("Redis heartbeat failed: %s", exc)
            self._cancel_seen.intersection_update(self._producing)

    async def _poll_cancel_flags(self) -> None:
        ids = [i for i in self._producing if i not in self._cancel_seen]
        if not ids:
            return
        async with self.client.redis.pipeline(transaction=False) as pipe:
            for stream_id in ids:
                pipe.hget(self.client.keys(stream_id).meta, "cancel")
            reasons = await pipe.execute()
        for stream_id, reason in zip(ids, reasons, strict=True):
            if reason is not None:
                self._deliver_cancel(stream_id, reason.decode())

    async def _sweep_dead_producers(self) -> None:
        """End the streams of dead producers that nobody reads (readers end them too)."""
        active_key = f"{self.client.prefix}active"
        active: dict[bytes, bytes] = await self.client.redis.hgetall(active_key)
        nodes = sorted(set(active.values()))
        if not nodes:
            return
        beats = await self.client.redis.mget([self.client.node_key(n.decode()) for n in nodes])
        dead = {n for n, beat in zip(nodes, beats, strict=True) if beat is None}
        for stream_id, node in active.items():
            if node in dead:
                with contextlib.suppress(JournalError):
                    state = await self.end_if_orphaned(stream_id.decode())
                    if state in (ProducerState.MISSING, ProducerState.ENDED):
                        await self.client.redis.hdel(active_key, stream_id)
