"""StreamManager: acceptance, exactly one terminal event whatever the backend does, cancel,
and the disconnect policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from tokenwire.backends.base import PushSource
from tokenwire.cancel import CancelToken
from tokenwire.errors import InvalidRequest
from tokenwire.events import Event, Progress, StreamCompleted, TextDelta
from tokenwire.journal import MemoryJournal
from tokenwire.requests import ChatRequest, Message
from tokenwire.router import Router
from tokenwire.streams import StreamManager

from .scripted import ScriptedBackend

pytestmark = pytest.mark.anyio


def request() -> ChatRequest:
    return ChatRequest(model="default", messages=[Message(role="user", content="hi")])


def manager(backend: ScriptedBackend, grace: float = 0.0) -> StreamManager:
    return StreamManager(Router(backend), MemoryJournal(), disconnect_grace=grace)


async def events_of(mgr: StreamManager, stream_id: str, after: int = -1) -> list[Event]:
    with anyio.fail_after(10):
        return [event async for event in mgr.read(stream_id, after)]


def types(events: list[Event]) -> list[str]:
    return [event.type for event in events]


async def test_happy_path_is_started_progress_text_usage_completed() -> None:
    mgr = manager(ScriptedBackend())
    meta = await mgr.start(request(), protocol="native")
    events = await events_of(mgr, meta.id)
    assert types(events) == [
        "stream.started",
        "progress",
        "text.delta",
        "text.delta",
        "text.delta",
        "usage",
        "stream.completed",
    ]
    assert [event.seq for event in events] == list(range(7))


async def test_request_error_before_first_event_raises_and_creates_no_stream() -> None:
    mgr = manager(ScriptedBackend(fail_before_first=InvalidRequest("no")))
    with pytest.raises(InvalidRequest):
        await mgr.start(request(), protocol="native")
    assert mgr.active_streams == 0


async def test_failure_mid_stream_keeps_partial_output_and_ends_failed() -> None:
    mgr = manager(ScriptedBackend(pieces=["a", "b", "c"], fail_after=2))
    meta = await mgr.start(request(), protocol="native")
    events = await events_of(mgr, meta.id)
    assert types(events)[-1] == "stream.failed"
    assert [e.text for e in events if e.type == "text.delta"] == ["a", "b"]  # type: ignore[attr-defined]
    assert events[-1].error["type"] == "backend_error"  # type: ignore[attr-defined]


async def test_backend_ending_silently_still_gets_exactly_one_terminal() -> None:
    mgr = manager(ScriptedBackend(end_silently=True))
    meta = await mgr.start(request(), protocol="native")
    events = await events_of(mgr, meta.id)
    terminals = [e for e in events if e.terminal]
    assert len(terminals) == 1 and terminals[0] is events[-1]
    assert events[-1].type == "stream.failed"


async def test_cancel_ends_with_cancelled_and_is_idempotent() -> None:
    backend = ScriptedBackend(pieces=["x"] * 1000, gap=0.005)
    mgr = manager(backend)
    meta = await mgr.start(request(), protocol="native")
    seen: list[Event] = []

    async def read() -> None:
        async for event in mgr.read(meta.id):
            seen.append(event)
            if len(seen) == 5:
                await mgr.cancel(meta.id)
                await mgr.cancel(meta.id)

    with anyio.fail_after(10):
        await read()
    assert seen[-1].type == "stream.cancelled"
    assert seen[-1].reason == "stop"  # type: ignore[attr-defined]
    assert len([e for e in seen if e.type == "text.delta"]) < 10
    await mgr.cancel(meta.id)  # after the end: still fine


async def test_last_reader_leaving_cancels_after_grace() -> None:
    backend = ScriptedBackend(pieces=["x"] * 1000, gap=0.01)
    mgr = manager(backend, grace=0.3)
    meta = await mgr.start(request(), protocol="native")
    async for event in mgr.read(meta.id):
        if event.seq == 3:
            break
    await asyncio.sleep(0.1)
    assert mgr.active_streams == 1  # still generating within the grace
    with anyio.fail_after(5):
        while mgr.active_streams:
            await asyncio.sleep(0.02)
    events = await events_of(mgr, meta.id)
    assert events[-1].type == "stream.cancelled"
    assert events[-1].reason == "disconnect"  # type: ignore[attr-defined]


async def test_a_returning_reader_within_grace_keeps_the_stream_alive() -> None:
    backend = ScriptedBackend(pieces=["x"] * 40, gap=0.01)
    mgr = manager(backend, grace=1.0)
    meta = await mgr.start(request(), protocol="native")
    last = -1
    async for event in mgr.read(meta.id):
        last = event.seq
        if last == 3:
            break
    await asyncio.sleep(0.2)
    events = await events_of(mgr, meta.id, after=last)
    assert events[0].seq == last + 1
    assert events[-1].type == "stream.completed"


# -- the fast path (backends.base.PushSource) ------------------------------------------------


class _Pushing:
    """An event iterator that pushes: the minimal ``PushSource``."""

    def __init__(self) -> None:
        self.sink: Callable[[Event], bool] | None = None
        self.pushed: list[bool] = []
        self._events: list[Event] = [Progress(stage="prefill")]

    def __aiter__(self) -> _Pushing:
        return self

    async def __anext__(self) -> Event:
        if self._events:
            return self._events.pop(0)
        if self.sink is not None:  # the producer waits while the source pushes
            self.pushed.append(self.sink(TextDelta(text="pushed")))
            self.sink = None
        return StreamCompleted()

    def push_to(self, sink: Callable[[Event], bool]) -> None:
        self.sink = sink


class _PushingBackend(ScriptedBackend):
    iterators: list[_Pushing]

    def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:  # type: ignore[override]
        if self.fail_before_first is not None:
            raise self.fail_before_first  # before the iterator exists, not in its first step
        self.iterators = [*getattr(self, "iterators", []), _Pushing()]
        return self.iterators[-1]


def _wrap(events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken) -> Any:
    async def wrapped() -> AsyncIterator[Event]:
        async for event in events:
            yield event

    return wrapped()


def _passthrough(events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken) -> Any:
    return events


async def test_a_push_source_gets_the_sink_unless_a_stage_wraps_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = _PushingBackend()
    assert isinstance(_Pushing(), PushSource)
    direct = StreamManager(Router(backend), MemoryJournal(), stages=[_passthrough])
    meta = await direct.start(request(), protocol="native")
    assert types(await events_of(direct, meta.id))[-2:] == ["text.delta", "stream.completed"]
    assert backend.iterators[-1].pushed == [True]  # journaled from the source's callback

    wrapped = StreamManager(Router(backend), MemoryJournal(), stages=[_passthrough, _wrap])
    with caplog.at_level(logging.DEBUG, logger="tokenwire.streams"):
        meta = await wrapped.start(request(), protocol="native")
        events = await events_of(wrapped, meta.id)
    assert backend.iterators[-1].pushed == []  # never offered a sink
    assert types(events) == ["stream.started", "progress", "stream.completed"]
    assert "_wrap" in caplog.text and "no fast path" in caplog.text


async def test_a_backend_that_raises_before_iterating_fails_the_start_not_hangs() -> None:
    mgr = StreamManager(
        Router(_PushingBackend(fail_before_first=InvalidRequest("no"))), MemoryJournal()
    )
    with anyio.fail_after(10), pytest.raises(InvalidRequest):
        await mgr.start(request(), protocol="native")
    assert mgr.active_streams == 0
