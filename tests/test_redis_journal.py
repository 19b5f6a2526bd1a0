"""RedisJournal against a real redis-server: numbering, seamless replay-to-live, TTL and
tombstones, group-committed appends, cross-replica cancel, reader presence, producer liveness.

Two RedisJournal instances on one Redis stand in for two replicas.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import pytest

from tokenwire.errors import JournalError, StreamExpired, StreamHandedOver, StreamNotFound
from tokenwire.events import Event, StreamCompleted, StreamFailed, StreamStarted, TextDelta
from tokenwire.journal import StreamMeta, open_journal
from tokenwire.journal.control import ProducerState
from tokenwire.journal.redis import RedisJournal

from .conftest import free_port
from .e2e.services import RedisServer, redis_server

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def pair(redis: RedisServer) -> AsyncIterator[tuple[RedisJournal, RedisJournal]]:
    """Two "replicas" sharing one Redis, under a key prefix of their own."""
    prefix = f"t{secrets.token_hex(3)}:"
    options = {"prefix": prefix, "heartbeat": 0.2, "liveness": 0.6, "ttl": 60.0}
    a = RedisJournal(redis.url, **options)  # type: ignore[arg-type]
    b = RedisJournal(redis.url, **options)  # type: ignore[arg-type]
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def new_meta() -> StreamMeta:
    return StreamMeta(id=secrets.token_urlsafe(8), model="m", protocol="native", created=0)


async def create(journal: RedisJournal, meta: StreamMeta) -> None:
    """What the stream manager does: become the producer, then create the log."""
    await journal.control.produce(meta.id)
    await journal.create(meta)


async def collect(journal: RedisJournal, stream_id: str, after: int = -1) -> list[Event]:
    return [event async for event in journal.read(stream_id, after)]


async def test_open_journal_builds_a_redis_journal(redis: RedisServer) -> None:
    journal = open_journal(redis.url, ttl=5.0, max_finished=3)
    assert isinstance(journal, RedisJournal)
    assert journal.ttl == 5.0 and journal.max_finished == 3
    await journal.close()


async def test_numbering_and_replay_on_another_replica(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    seqs = [await a.append(meta.id, StreamStarted(id=meta.id, model="m", created=0))]
    seqs += [await a.append(meta.id, TextDelta(text=f"t{i} ")) for i in range(20)]
    seqs.append(await a.append(meta.id, StreamCompleted(finish_reason="stop")))
    assert seqs == list(range(22))
    assert (await b.meta(meta.id)).to_dict() == meta.to_dict()
    events = await collect(b, meta.id)
    assert [e.seq for e in events] == list(range(22))
    assert isinstance(events[0], StreamStarted) and isinstance(events[-1], StreamCompleted)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).split() == [
        f"t{i}" for i in range(20)
    ]
    # Resume from every point: exactly the events after it.
    for after in (-1, 0, 5, 20):
        assert [e.seq for e in await collect(b, meta.id, after)] == list(range(after + 1, 22))


async def test_a_produced_stream_keeps_its_metadata_and_events_compactly(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    """What a producer keeps per stream (its metadata, its events until the terminal one is
    stored) is held in bytes of their own size: orjson's results keep a ~4 KB buffer each."""
    a, _ = pair
    metas = [new_meta() for _ in range(50)]
    for meta in metas:
        await a.control.produce(meta.id)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for meta in metas:
            await a.create(meta)
            await a.append(meta.id, TextDelta(text="x"))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    ours = [tracemalloc.Filter(True, "*/tokenwire/journal/redis/*")]
    kept = sum(
        stat.size_diff
        for stat in after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
    )
    per_stream = kept / len(metas)
    assert per_stream < 4000, per_stream  # was ~9 KB: two orjson buffers per stream


async def test_resume_after_the_terminal_event_returns_at_once(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    await a.append(meta.id, TextDelta(text="x"))
    await a.append(meta.id, StreamCompleted())
    started = time.monotonic()
    assert await asyncio.wait_for(collect(b, meta.id, after=1), 5) == []
    assert await asyncio.wait_for(collect(b, meta.id, after=7), 5) == []
    assert time.monotonic() - started < 2.0


async def test_no_gap_or_duplicate_at_the_replay_live_seam(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    """Readers join at random moments while the producer appends with random pauses."""
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    total = 400

    async def produce() -> None:
        for i in range(total):
            await a.append(meta.id, TextDelta(text=f"{i},"))
            if i % 7 == 0:
                await asyncio.sleep(0.002)
        await a.append(meta.id, StreamCompleted())

    async def late_reader(delay: float, after: int) -> list[int]:
        await asyncio.sleep(delay)
        return [e.seq async for e in b.read(meta.id, after)]

    producer = asyncio.create_task(produce())
    readers = [late_reader(0.01 * i, after) for i, after in enumerate([-1, 3, 50, 120, 199, -1])]
    results = await asyncio.wait_for(asyncio.gather(*readers), 30)
    await producer
    for after, seqs in zip([-1, 3, 50, 120, 199, -1], results, strict=True):
        assert seqs == list(range(after + 1, total + 1))


async def test_appends_are_group_committed(
    pair: tuple[RedisJournal, RedisJournal], redis: RedisServer
) -> None:
    """A burst of appends costs far fewer Redis calls than events."""
    a, _ = pair
    meta = new_meta()
    await create(a, meta)
    before = _evalsha_calls(redis)
    n = 2000
    for i in range(n):
        await a.append(meta.id, TextDelta(text=str(i)))
        if i % 50 == 0:
            await asyncio.sleep(0)  # tokens arrive between other loop work
    await a.append(meta.id, StreamCompleted())
    calls = _evalsha_calls(redis) - before
    assert 1 <= calls < n / 10, calls
    assert [e.seq for e in await collect(a, meta.id, after=n - 3)] == [n - 2, n - 1, n]


def _evalsha_calls(redis: RedisServer) -> int:
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_unknown_and_expired_streams(redis: RedisServer) -> None:
    journal = RedisJournal(redis.url, ttl=0.5, prefix=f"t{secrets.token_hex(3)}:")
    try:
        with pytest.raises(StreamNotFound, match="No stream"):
            await journal.meta("never-was")
        with pytest.raises(StreamNotFound):
            await collect(journal, "never-was")  # type: ignore[arg-type]
        meta = new_meta()
        await create(journal, meta)
        await journal.append(meta.id, StreamCompleted())
        assert [e.seq for e in await collect(journal, meta.id)] == [0]
        await asyncio.sleep(0.8)
        with pytest.raises(StreamExpired, match=r"expired.*kept for 0\.5s"):
            await journal.meta(meta.id)
        with pytest.raises(StreamExpired):
            await collect(journal, meta.id)  # type: ignore[arg-type]
    finally:
        await journal.close()


async def test_finished_streams_beyond_the_bound_are_evicted_oldest_first(
    redis: RedisServer,
) -> None:
    journal = RedisJournal(
        redis.url, max_finished=2, heartbeat=0.1, liveness=0.2, prefix=f"t{secrets.token_hex(3)}:"
    )
    await journal.start()
    try:
        metas = [new_meta() for _ in range(4)]
        for meta in metas:
            await create(journal, meta)
            await journal.append(meta.id, StreamCompleted())
        await asyncio.sleep(0.6)  # a sweep runs every `liveness` seconds
        for meta in metas[:2]:
            with pytest.raises(StreamExpired):
                await journal.meta(meta.id)
        for meta in metas[2:]:
            assert (await journal.meta(meta.id)).id == meta.id
    finally:
        await journal.close()


async def test_cancel_reaches_the_producing_replica(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    requests = a.control.cancel_requests()
    started = time.monotonic()
    await b.control.signal_cancel(meta.id, "stop")
    assert await asyncio.wait_for(anext(requests), 5) == (meta.id, "stop")
    assert time.monotonic() - started < 1.0  # pub/sub, not the polling fallback
    # Replica b produces nothing, so it is not asked.
    assert b.control._cancels.empty()


async def test_cancel_flag_is_polled_when_the_message_was_missed(
    pair: tuple[RedisJournal, RedisJournal], redis: RedisServer
) -> None:
    a, _ = pair
    meta = new_meta()
    await create(a, meta)
    # Set the flag without publishing, as if the pub/sub message was lost.
    redis.cli("HSET", f"{a.prefix}{{{meta.id}}}:meta", "cancel", "stop")
    assert await asyncio.wait_for(anext(a.control.cancel_requests()), 5) == (meta.id, "stop")


async def test_reader_presence_is_visible_to_other_replicas(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    await a.append(meta.id, TextDelta(text="x"))
    assert await a.control.reader_seen(meta.id) is None
    reader = b.read(meta.id)
    assert (await anext(reader)).seq == 0
    seen = await a.control.reader_seen(meta.id)
    assert seen is not None and seen > time.time()  # present right now
    await reader.aclose()
    await asyncio.sleep(0.2)
    seen = await a.control.reader_seen(meta.id)
    assert seen is not None and seen <= time.time()  # left, and when


async def test_names_are_shared_by_replicas_and_say_whether_the_stream_runs(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    """A wire's own name for a stream (the UI message stream's chat id): set on one replica,
    found on the other; the stream's own state says whether it still runs."""
    a, b = pair
    assert await b.control.named_stream("chat-1") is None
    first, second = new_meta(), new_meta()
    await create(a, first)
    await a.control.name_stream("chat-1", first.id)
    assert await b.control.named_stream("chat-1") == first.id
    assert await b.control.end_if_orphaned(first.id) == ProducerState.ALIVE
    await a.append(first.id, StreamCompleted())
    assert await b.control.end_if_orphaned(first.id) == ProducerState.ENDED
    await create(b, second)
    await b.control.name_stream("chat-1", second.id)  # a later name replaces the earlier one
    assert await a.control.named_stream("chat-1") == second.id


async def test_readers_of_a_dead_producer_get_a_terminal_failure(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    for i in range(3):
        await a.append(meta.id, TextDelta(text=str(i)))
    await asyncio.sleep(0.1)
    # Fault injection: replica a stops heartbeating, as a SIGKILLed process would.
    for task in a.control._background:
        task.cancel()
    started = time.monotonic()
    events = await asyncio.wait_for(collect(b, meta.id), 10)
    waited = time.monotonic() - started
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert isinstance(events[-1], StreamFailed)
    assert events[-1].error["code"] == "producer_lost"
    # Liveness, then seen dead twice 2 heartbeats apart (a beat lost to a Redis restart).
    assert waited < 0.6 + 0.2 * 8
    # A second reader sees the same single terminal event.
    again = await collect(b, meta.id)
    assert [type(e) for e in again] == [type(e) for e in events]
    # The zombie producer can no longer append.
    await asyncio.sleep(0.05)
    with pytest.raises(JournalError):
        await a.append(meta.id, StreamCompleted())


async def test_unreachable_redis_is_a_journal_error() -> None:
    journal = RedisJournal(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(JournalError, match="Redis journal"):
        await journal.meta("x")
    with pytest.raises(JournalError):
        await create(journal, new_meta())
    await journal.close()


async def test_appends_survive_a_flushed_script_cache(
    pair: tuple[RedisJournal, RedisJournal], redis: RedisServer
) -> None:
    """NOSCRIPT (Redis restarted or SCRIPT FLUSH) reloads the script and retries."""
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    await a.append(meta.id, TextDelta(text="before"))
    await asyncio.sleep(0.05)
    redis.cli("SCRIPT", "FLUSH")
    await a.append(meta.id, TextDelta(text="after"))
    await a.append(meta.id, StreamCompleted())
    events = await collect(b, meta.id)
    assert [e.seq for e in events] == [0, 1, 2]
    assert [getattr(e, "text", None) for e in events] == ["before", "after", None]


async def test_a_cancelled_reader_stops_whenever_the_cancel_lands(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    """Regression: redis-py absorbed cancellations landing mid-command, so a reader whose
    client had left read on for ever and kept its stream alive past the disconnect grace."""
    import random

    a, b = pair
    meta = new_meta()
    await create(a, meta)
    await a.append(meta.id, TextDelta(text="x"))

    async def produce() -> None:
        while True:
            await a.append(meta.id, TextDelta(text="y"))
            await asyncio.sleep(0.003)

    async def read_forever() -> None:
        async for _ in b.read(meta.id):
            pass

    producer = asyncio.create_task(produce())
    rng = random.Random(3)
    try:
        for _ in range(60):
            reader = asyncio.create_task(read_forever())
            await asyncio.sleep(rng.uniform(0, 0.02))
            reader.cancel()
            done, _ = await asyncio.wait({reader}, timeout=2.0)
            assert done, "a cancelled reader went on reading"
    finally:
        producer.cancel()


async def test_a_reader_survives_its_connection_being_dropped(
    pair: tuple[RedisJournal, RedisJournal], redis: RedisServer
) -> None:
    """The reader's Redis connection is killed mid-stream: it reconnects and goes on from
    where it was, no gap, no duplicate."""
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    seen: list[int] = []

    async def read_all() -> None:
        async for event in b.read(meta.id):
            seen.append(event.seq)

    reader = asyncio.create_task(read_all())
    for i in range(30):
        await a.append(meta.id, TextDelta(text=str(i)))
        await asyncio.sleep(0.01)
        if i in (10, 20):
            await asyncio.sleep(0.05)  # the reader now blocks in XREAD
            killed = [
                line.split()[0].split("=")[1]
                for line in redis.cli("CLIENT", "LIST").splitlines()
                if "cmd=xread" in line
            ]
            assert killed
            for client_id in killed:
                redis.cli("CLIENT", "KILL", "ID", client_id)
    await a.append(meta.id, StreamCompleted())
    await asyncio.wait_for(reader, 20)
    assert seen == list(range(31))


async def test_snapshot_and_delete_from_another_replica(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    await a.append(meta.id, StreamStarted(id=meta.id, model="m", created=0))
    await a.append(meta.id, TextDelta(text="x"))
    await a._stored(a._producing[meta.id], 1)  # flushed (appends are group-committed)
    assert [e.seq for e in await asyncio.wait_for(b.snapshot(meta.id), 5)] == [0, 1]
    await a.append(meta.id, StreamCompleted())
    assert isinstance((await b.snapshot(meta.id))[-1], StreamCompleted)
    await b.delete(meta.id)
    with pytest.raises(StreamNotFound):
        await a.snapshot(meta.id)
    with pytest.raises(StreamNotFound):
        await a.meta(meta.id)


# -- ownership: claim, release, fencing (the control plane's API for takeover) ----------------


async def _stop_heartbeat(journal: RedisJournal, redis: RedisServer) -> None:
    """Fault injection: the replica stops beating and its lease is gone, as after SIGKILL."""
    for task in journal.control._background:
        task.cancel()
    redis.cli("DEL", journal.client.node_key(journal.client.node))


async def test_claim_is_atomic_and_fences_the_old_producer(redis: RedisServer) -> None:
    prefix = f"t{secrets.token_hex(3)}:"
    options = {"prefix": prefix, "heartbeat": 0.2, "liveness": 0.6, "ttl": 60.0}
    replicas = [RedisJournal(redis.url, **options) for _ in range(4)]  # type: ignore[arg-type]
    a, *others = replicas
    try:
        meta = new_meta()
        await create(a, meta)
        for i in range(3):
            await a.append(meta.id, TextDelta(text=str(i)))
        await asyncio.sleep(0.05)
        # Alive: nobody may take it.
        assert [await r.control.claim(meta.id) for r in others] == [None] * 3
        await _stop_heartbeat(a, redis)
        claims = await asyncio.gather(*(r.control.claim(meta.id) for r in others))
        won = [(r, c) for r, c in zip(others, claims, strict=True) if c is not None]
        assert len(won) == 1, claims
        winner, claim = won[0]
        assert claim.next_seq == 3 and claim.previous == a.client.node
        # The presumed-dead producer wakes up: its appends are refused, typed.
        with pytest.raises(StreamHandedOver):
            await a.append(meta.id, TextDelta(text="zombie"))
            await a.append(meta.id, StreamCompleted())
        # The winner continues the same log: seqs go on, nothing in between.
        winner.resume_producing(meta.id, claim.next_seq, meta)
        assert await winner.append(meta.id, TextDelta(text="3")) == 3
        assert await winner.append(meta.id, StreamCompleted()) == 4
        events = await collect(others[0], meta.id)
        assert [e.seq for e in events] == [0, 1, 2, 3, 4]
        assert [getattr(e, "text", None) for e in events] == ["0", "1", "2", "3", None]
        # Ended: no one claims it any more.
        assert await others[0].control.claim(meta.id) is None
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_released_stream_is_claimed_at_once(
    pair: tuple[RedisJournal, RedisJournal],
) -> None:
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    await a.append(meta.id, TextDelta(text="x"))
    await asyncio.sleep(0.05)
    assert await b.control.claim(meta.id) is None  # a is alive and holds it
    await a.control.release(meta.id)
    claim = await b.control.claim(meta.id)
    assert claim is not None and claim.next_seq == 1


# -- Redis losing what it acknowledged (restart empty, failover before replication) ----------


async def test_a_stream_redis_lost_is_appended_again(
    pair: tuple[RedisJournal, RedisJournal], redis: RedisServer
) -> None:
    """As after a restart without persistence: the stream's keys are gone mid-stream. The
    producer re-creates it from what it kept and appends everything again."""
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    for i in range(5):
        await a.append(meta.id, TextDelta(text=str(i)))
    await asyncio.sleep(0.05)
    keys = a.client.keys(meta.id)
    redis.cli("DEL", keys.events, keys.meta)
    for i in range(5, 8):
        await a.append(meta.id, TextDelta(text=str(i)))
    await a.append(meta.id, StreamCompleted())
    events = await asyncio.wait_for(collect(b, meta.id), 10)
    assert [e.seq for e in events] == list(range(9))
    assert [getattr(e, "text", None) for e in events] == [*map(str, range(8)), None]
    assert (await b.meta(meta.id)).to_dict() == meta.to_dict()


async def test_a_lost_tail_is_appended_again_without_duplicates(
    pair: tuple[RedisJournal, RedisJournal], redis: RedisServer
) -> None:
    """As after a failover to a replica that had not received the last entries: Redis holds
    a prefix. The producer's next append notices the gap and re-appends from there."""
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    for i in range(6):
        await a.append(meta.id, TextDelta(text=str(i)))
    await asyncio.sleep(0.05)
    keys = a.client.keys(meta.id)
    kept = redis.cli("--no-raw", "XRANGE", keys.events, "-", "0-3")
    assert kept.count("0-") == 3
    redis.cli("DEL", keys.events)
    for n in range(1, 4):
        redis.cli("XADD", keys.events, f"0-{n}", "e", f'{{"type":"text.delta","text":"{n - 1}"}}')
    await a.append(meta.id, TextDelta(text="6"))
    await a.append(meta.id, StreamCompleted())
    events = await asyncio.wait_for(collect(b, meta.id), 10)
    assert [e.seq for e in events] == list(range(8))
    assert [getattr(e, "text", None) for e in events] == [*map(str, range(7)), None]


async def test_finished_streams_are_verified_after_redis_trouble(
    pair: tuple[RedisJournal, RedisJournal], redis: RedisServer
) -> None:
    """A failover can lose a stream whose terminal event Redis had acknowledged; the
    producer keeps finished streams for ``outage`` seconds and appends them again once
    Redis answers after trouble."""
    a, b = pair
    meta = new_meta()
    await create(a, meta)
    await a.append(meta.id, TextDelta(text="kept"))
    await a.append(meta.id, StreamCompleted())
    keys = a.client.keys(meta.id)
    redis.cli("DEL", keys.events, keys.meta, keys.gone)
    a.verify_after_trouble()  # what the heartbeat or the flusher call after an outage
    await asyncio.sleep(0.3)
    events = await asyncio.wait_for(collect(b, meta.id), 10)
    assert [(e.seq, type(e).__name__) for e in events] == [
        (0, "TextDelta"),
        (1, "StreamCompleted"),
    ]
