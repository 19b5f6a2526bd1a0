"""A relayed chunk goes from the upstream's socket to the client's with no task woken.

- the journal's direct delivery hands a reader that waits caught up each live event in the
  appending task, and the reader stays asleep; what it refuses (or the end) wakes it;
- the stream manager hands a push source a sink only when no stage wraps it; the sink
  refuses the terminal event, Stop and the size limit, which the producer then handles;
- an upstream call pushes each read's events from the network callback while its reader
  sleeps, and hands the reader the rest (refused events, a malformed chunk, the end);
- end to end through a real uvicorn and a real upstream, the chunks take that path and
  arrive whole and in order, the same bytes a journal without direct delivery gives.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.fault_upstream import RunningFault, fault_upstream
from tests.scripted import serve_app_in_thread
from tokenwire.backends._call import Phase
from tokenwire.backends._upstream import Endpoint, UpstreamCall
from tokenwire.backends.base import Backend, EventSink, ModelInfo
from tokenwire.backends.openai import OpenAIBackend
from tokenwire.cancel import CancelToken
from tokenwire.errors import BackendProtocolError
from tokenwire.events import (
    Event,
    Progress,
    StreamCompleted,
    StreamFailed,
    TextDelta,
    Usage,
)
from tokenwire.journal import MemoryJournal, StreamMeta
from tokenwire.requests import ChatRequest, Message
from tokenwire.router import Router
from tokenwire.server.http import DirectWrite
from tokenwire.streams import StreamManager

pytestmark = pytest.mark.anyio


def meta() -> StreamMeta:
    return StreamMeta(id="s1", model="m", protocol="native", created=0)


def seqs(batch: list[Event]) -> list[int]:
    return [event.seq for event in batch]


# -- the journal's direct delivery -------------------------------------------------------------


async def test_direct_delivery_takes_live_events_while_the_reader_sleeps() -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    journal.append_nowait("s1", TextDelta(text="0"))
    delivered: list[list[int]] = []

    def deliver(batch: list[Event]) -> bool:
        delivered.append(seqs(batch))
        return True

    batches = journal.read_batches("s1", direct=deliver)
    assert seqs(await anext(batches)) == [0]  # the replay goes the usual way
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.01)
    for i in range(1, 4):
        assert journal.append_nowait("s1", TextDelta(text=str(i)))
    assert delivered == [[1], [2], [3]]  # in the appending task, one at a time
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the reader slept through them

    journal.append_nowait("s1", StreamCompleted())
    # The end is never delivered directly: the reader wakes for it, and only for it.
    assert seqs(await asyncio.wait_for(waiting, 2)) == [4]
    assert delivered == [[1], [2], [3]]
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


@pytest.mark.parametrize("refusal", ["false", "raises"])
async def test_a_refused_event_wakes_the_reader_with_it_and_delivery_resumes(
    refusal: str,
) -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    delivered: list[int] = []

    def deliver(batch: list[Event]) -> bool:
        if batch[0].seq == 2:
            if refusal == "raises":
                raise RuntimeError("a renderer bug")
            return False
        delivered.extend(seqs(batch))
        return True

    batches = journal.read_batches("s1", direct=deliver)
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.01)
    for i in range(4):
        journal.append_nowait("s1", TextDelta(text=str(i)))
    # 0 and 1 delivered; 2 refused: the reader wakes for it, and 3 (appended before it
    # ran) waits in the journal for it too.
    assert delivered == [0, 1]
    assert seqs(await asyncio.wait_for(waiting, 2)) == [2, 3]
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.01)
    journal.append_nowait("s1", TextDelta(text="4"))  # caught up again: direct again
    assert delivered == [0, 1, 4]
    assert not waiting.done()
    journal.append_nowait("s1", StreamCompleted())
    assert seqs(await asyncio.wait_for(waiting, 2)) == [5]


async def test_fan_out_one_reader_takes_directly_another_wakes() -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    taken: list[int] = []

    def takes(batch: list[Event]) -> bool:
        taken.extend(seqs(batch))
        return True

    eager = journal.read_batches("s1", direct=takes)
    busy = journal.read_batches("s1", direct=lambda batch: False)
    plain = journal.read_batches("s1")
    waits = [asyncio.ensure_future(anext(it)) for it in (eager, busy, plain)]
    await asyncio.sleep(0.01)
    journal.append_nowait("s1", TextDelta(text="a"))
    assert taken == [0]
    await asyncio.sleep(0.01)
    assert [w.done() for w in waits] == [False, True, True]
    assert seqs(waits[1].result()) == seqs(waits[2].result()) == [0]


async def test_a_reader_that_leaves_is_no_longer_delivered_to() -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    delivered: list[int] = []

    def deliver(batch: list[Event]) -> bool:
        delivered.extend(seqs(batch))
        return True

    batches = journal.read_batches("s1", direct=deliver)
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.01)
    waiting.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await waiting
    journal.append_nowait("s1", TextDelta(text="late"))
    assert delivered == []


# -- the stream manager's sink -----------------------------------------------------------------


class PushingBackend(Backend):
    """A push source the test drives by hand: ``push`` calls the sink the manager gave,
    and what it refuses is what the iterator yields."""

    name = "pushing"

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("pushing")]

    def __init__(self) -> None:
        self.sink: EventSink | None = None
        self.refused: asyncio.Queue[Event] = asyncio.Queue()
        self.offered = asyncio.Event()

    def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        return _PushIterator(self)

    def push(self, event: Event) -> bool:
        assert self.sink is not None
        if self.sink(event):
            return True
        self.refused.put_nowait(event)
        return False


class _PushIterator:
    def __init__(self, backend: PushingBackend) -> None:
        self.backend = backend
        self.first = True

    def __aiter__(self) -> _PushIterator:
        return self

    def push_to(self, sink: EventSink) -> None:
        self.backend.sink = sink
        self.backend.offered.set()

    async def __anext__(self) -> Event:
        if self.first:
            self.first = False
            return Progress(stage="connecting")
        return await self.backend.refused.get()

    async def aclose(self) -> None:
        pass


def chat() -> ChatRequest:
    return ChatRequest(model="pushing", messages=[Message(role="user", content="hi")])


async def all_events(manager: StreamManager, stream_id: str) -> list[Event]:
    return [event async for event in manager.read(stream_id)]


async def test_pushed_events_are_journaled_and_the_refused_end_finishes_the_stream() -> None:
    backend = PushingBackend()
    manager = StreamManager(Router(backend), MemoryJournal())
    stream = await manager.start(chat(), protocol="native")
    await asyncio.wait_for(backend.offered.wait(), 2)
    reading = asyncio.ensure_future(all_events(manager, stream.id))
    assert backend.push(TextDelta(text="a"))
    assert backend.push(TextDelta(text="b"))
    assert backend.push(Usage(prompt_tokens=1, completion_tokens=2))
    assert not backend.push(StreamCompleted(finish_reason="stop"))  # the producer's
    events = await asyncio.wait_for(reading, 5)
    assert [type(e).__name__ for e in events] == [
        "StreamStarted",
        "Progress",
        "TextDelta",
        "TextDelta",
        "Usage",
        "StreamCompleted",
    ]
    assert [e.seq for e in events] == list(range(6))


async def test_the_sink_refuses_after_stop_and_the_stream_ends_cancelled() -> None:
    backend = PushingBackend()
    manager = StreamManager(Router(backend), MemoryJournal())
    stream = await manager.start(chat(), protocol="native")
    await asyncio.wait_for(backend.offered.wait(), 2)
    assert backend.push(TextDelta(text="kept"))
    await manager.cancel(stream.id)
    assert not backend.push(TextDelta(text="after stop"))
    events = await asyncio.wait_for(all_events(manager, stream.id), 5)
    assert [type(e).__name__ for e in events[-2:]] == ["TextDelta", "StreamCancelled"]
    assert "after stop" not in [getattr(e, "text", None) for e in events]


async def test_the_size_limit_holds_for_pushed_events() -> None:
    backend = PushingBackend()
    manager = StreamManager(Router(backend), MemoryJournal(), max_stream_bytes=400)
    stream = await manager.start(chat(), protocol="native")
    await asyncio.wait_for(backend.offered.wait(), 2)
    pushed = 0
    while backend.push(TextDelta(text="x" * 40)):
        pushed += 1
    events = await asyncio.wait_for(all_events(manager, stream.id), 5)
    texts = [e for e in events if isinstance(e, TextDelta)]
    assert 0 < len(texts) == pushed  # everything before the limit is kept
    assert isinstance(events[-1], StreamFailed)
    assert events[-1].error["type"] == "stream_too_large"


async def test_no_sink_when_a_stage_wraps_the_source() -> None:
    async def stage(
        events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        async for event in events:
            yield event

    backend = PushingBackend()
    manager = StreamManager(Router(backend), MemoryJournal(), stages=[stage])
    await manager.start(chat(), protocol="native")
    await asyncio.sleep(0.05)
    assert backend.sink is None  # a push would skip the stage


async def test_no_sink_when_the_journal_must_await_appends() -> None:
    class AwaitingJournal(MemoryJournal):  # as Redis: every append is a round trip
        appends_nowait = False

    backend = PushingBackend()
    manager = StreamManager(Router(backend), AwaitingJournal())
    await manager.start(chat(), protocol="native")
    await asyncio.sleep(0.05)
    assert backend.sink is None


# -- an upstream call pushes from the network callback -----------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningFault]:
    with fault_upstream() as running:
        yield running


def backend_for(upstream: RunningFault) -> OpenAIBackend:
    return OpenAIBackend(Endpoint(name="fault", url=upstream.url))


async def call_with_sink(
    upstream: RunningFault, model: str, prompt: str, sink: EventSink
) -> tuple[UpstreamCall, AsyncIterator[Event]]:
    backend = backend_for(upstream)
    await backend.start()
    request = ChatRequest(model=model, messages=[Message(role="user", content=prompt)])
    call = backend.open(request, CancelToken(), model)
    call.push_to(sink)
    return call, call.events()


async def test_an_upstream_call_pushes_while_its_reader_sleeps(upstream: RunningFault) -> None:
    pushed: list[Event] = []
    reader_got: list[Event] = []

    def sink(event: Event) -> bool:
        if event.terminal:
            return False
        pushed.append(event)
        return True

    call, events = await call_with_sink(upstream, "ok", "n=6 gap=0.05", sink)
    try:
        async with asyncio.timeout(10):
            async for event in events:
                reader_got.append(event)
    finally:
        await call.aclose()
    # The first token reaches the reader (failover is decided on it); the rest were
    # pushed, and the reader woke only for the end.
    texts = [e.text for e in reader_got + pushed if isinstance(e, TextDelta)]
    assert texts == [f"tok{i} " for i in range(6)]
    assert len([e for e in pushed if isinstance(e, TextDelta)]) >= 4
    assert isinstance(reader_got[-1], StreamCompleted)
    assert not any(isinstance(e, TextDelta) for e in reader_got[1:])
    assert any(isinstance(e, Usage) for e in pushed)


async def test_the_body_is_read_in_the_network_callback_before_the_first_token(
    upstream: RunningFault,
) -> None:
    # The opening task only sends the request and awaits the headers: the body's reads up
    # to the first token are decoded in the network callback, which wakes the consumer.
    # Stop then closes the body there (no task to cancel), and the call ends quietly.
    backend = backend_for(upstream)
    await backend.start()
    cancel = CancelToken()
    request = ChatRequest(model="silent", messages=[Message(role="user", content="")])
    call = backend.open(request, cancel, "silent")
    got: list[Event] = []
    try:
        await asyncio.wait_for(asyncio.shield(call.opened), 10)
        await asyncio.sleep(0.05)
        assert call._task is None and not call.content_started  # ended, and dropped
        cancel.cancel("stop")
        async with asyncio.timeout(5):
            async for event in call.events():
                got.append(event)
    finally:
        await call.aclose()
    assert not any(isinstance(e, TextDelta) for e in got)  # ended quietly, no error
    assert call.ready.done() and call.phase is Phase.ENDED


async def test_a_malformed_chunk_after_pushed_ones_fails_the_reader(
    upstream: RunningFault,
) -> None:
    pushed: list[str] = []

    def sink(event: Event) -> bool:
        if isinstance(event, TextDelta):
            pushed.append(event.text)
            return True
        return False

    call, events = await call_with_sink(upstream, "malformed", "after=4 gap=0.05", sink)
    got: list[Event] = []
    try:
        with pytest.raises(BackendProtocolError):
            async with asyncio.timeout(10):
                async for event in events:
                    got.append(event)
    finally:
        await call.aclose()
    texts = [e.text for e in got if isinstance(e, TextDelta)] + pushed
    assert texts == [f"tok{i} " for i in range(4)]  # everything before the bad chunk
    assert pushed  # and it came by push


# -- end to end: a real upstream, tokenwire under uvicorn, a client ----------------------------


def gateway(upstream: RunningFault, **settings: Any) -> Any:
    return serve_app_in_thread(
        None, no_embedded=True, upstream=[f"fault={upstream.url}"], **settings
    )


def stream_body(url: str, prompt: str) -> tuple[list[dict[str, Any]], list[float]]:
    chunks: list[dict[str, Any]] = []
    arrivals: list[float] = []
    body = {
        "model": "ok",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": prompt}],
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=20) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(orjson.loads(line[6:]))
                arrivals.append(time.monotonic())
            elif line == "data: [DONE]":
                chunks.append({"done": True})
    return chunks, arrivals


@pytest.mark.timeout(90)
def test_end_to_end_chunks_are_pushed_and_written_directly_in_order(
    upstream: RunningFault, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = {"pushed": 0, "direct": 0}
    pushed, direct = UpstreamCall._pushed, DirectWrite.write

    def counting_pushed(self: UpstreamCall, raw: bytes) -> bool:
        counts["pushed"] += 1
        return pushed(self, raw)

    def counting_direct(self: DirectWrite, body: bytes) -> None:
        counts["direct"] += 1
        direct(self, body)

    monkeypatch.setattr(UpstreamCall, "_pushed", counting_pushed)
    monkeypatch.setattr(DirectWrite, "write", counting_direct)
    with gateway(upstream) as url:
        chunks, arrivals = stream_body(url, "n=12 gap=0.05")
    assert counts["pushed"] >= 10 and counts["direct"] >= 10
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert "".join(t or "" for t in texts) == "".join(f"tok{i} " for i in range(12))
    assert chunks[-2]["usage"]["completion_tokens"] == 12 and chunks[-1] == {"done": True}
    # Each token arrived as it was sent (not held back): ~50 ms apart.
    gaps = [b - a for a, b in itertools.pairwise(arrivals[2:13])]
    assert sorted(gaps)[len(gaps) // 2] > 0.02

    # A stage in the way (coalescing asked for) turns pushing off; the text is the same.
    counts.update(pushed=0, direct=0)
    with gateway(upstream, coalesce="word") as url:
        coalesced, _ = stream_body(url, "n=12 gap=0.05")
    assert counts["pushed"] == 0
    texts = [c["choices"][0]["delta"].get("content") for c in coalesced if c.get("choices")]
    assert "".join(t or "" for t in texts) == "".join(f"tok{i} " for i in range(12))
