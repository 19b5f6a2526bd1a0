"""MemoryJournal: numbering, replay then live with no gap or duplicate, TTL eviction."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.errors import StreamExpired, StreamNotFound
from tokenwire.events import StreamCompleted, StreamStarted, TextDelta
from tokenwire.journal import MemoryJournal, StreamMeta

pytestmark = pytest.mark.anyio


def meta(stream_id: str = "s1") -> StreamMeta:
    return StreamMeta(id=stream_id, model="m", protocol="native", created=0)


async def test_append_numbers_events_in_order() -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    seqs = [
        await journal.append("s1", StreamStarted(id="s1", model="m", created=0)),
        await journal.append("s1", TextDelta(text="a")),
        await journal.append("s1", StreamCompleted()),
    ]
    assert seqs == [0, 1, 2]
    assert [e.seq async for e in journal.read("s1")] == [0, 1, 2]


async def test_reader_joining_mid_stream_sees_every_later_event_once() -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    for i in range(5):
        await journal.append("s1", TextDelta(text=str(i)))

    async def produce() -> None:
        for i in range(5, 50):
            await journal.append("s1", TextDelta(text=str(i)))
            if i % 7 == 0:
                await asyncio.sleep(0)
        await journal.append("s1", StreamCompleted())

    seen: list[int] = []

    async def consume() -> None:
        async for event in journal.read("s1", after=2):
            seen.append(event.seq)

    with anyio_timeout(5):
        await asyncio.gather(consume(), produce())
    assert seen == list(range(3, 51))


async def test_unknown_and_expired_streams() -> None:
    journal = MemoryJournal(ttl=0.0)
    with pytest.raises(StreamNotFound):
        await journal.meta("nope")
    await journal.create(meta("old"))
    await journal.append("old", StreamCompleted())
    journal.evict()
    with pytest.raises(StreamExpired, match="expired"):
        await journal.meta("old")


async def test_count_bound_evicts_oldest_finished_first() -> None:
    journal = MemoryJournal(max_finished=2)
    for name in ("a", "b", "c"):
        await journal.create(meta(name))
        await journal.append(name, StreamCompleted())
    journal.evict()
    with pytest.raises(StreamExpired):
        await journal.meta("a")
    assert (await journal.meta("c")).id == "c"


def anyio_timeout(seconds: float):  # type: ignore[no-untyped-def]
    import anyio

    return anyio.fail_after(seconds)


async def test_snapshot_does_not_wait_and_delete_forgets_a_finished_stream() -> None:
    journal = MemoryJournal(max_bytes=10_000)
    await journal.create(meta())
    await journal.append("s1", TextDelta(text="a"))
    assert [e.seq for e in await journal.snapshot("s1")] == [0]  # no terminal yet: no wait
    await journal.delete("s1")  # still generating: kept until its end
    await journal.append("s1", StreamCompleted())
    assert [e.type for e in await journal.snapshot("s1")] == ["text.delta", "stream.completed"]
    await journal.delete("s1")
    with pytest.raises(StreamNotFound):  # gone, not expired
        await journal.snapshot("s1")
    assert journal.stats()["bytes"] == 0


async def test_what_a_protocol_stores_with_a_stream_counts_toward_max_bytes() -> None:
    journal = MemoryJournal(max_bytes=2_000)
    stored = StreamMeta(id="big", model="m", protocol="x", created=0, render={"input": "x" * 1500})
    await journal.create(stored)
    await journal.append("big", StreamCompleted())
    await journal.create(meta("next"))
    await journal.append("next", TextDelta(text="y" * 600))
    await journal.append("next", StreamCompleted())
    with pytest.raises(StreamExpired):  # evicted: 1.5 KB of input plus the new events
        await journal.meta("big")
