"""The relay hot path's shortcuts equal the slow paths they replace.

- ``read_batches`` hands a reader every event already journaled in one batch, in order,
  ending with the terminal; a default journal yields them one by one;
- the OpenAI renderer's spliced text chunk is byte-for-byte the JSON of the full dict;
- ``event_size``'s TextDelta shortcut counts the same bytes as encoding ``to_dict()``;
- the gateway's iterator hands over to the upstream call's events after the first token,
  and closing it still closes both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from tokenwire.events import Event, Progress, StreamCompleted, TextDelta, ToolCallDelta, Usage
from tokenwire.journal import Journal, MemoryJournal, StreamMeta
from tokenwire.journal.base import event_size
from tokenwire.protocols.openai_chat import Renderer

pytestmark = pytest.mark.anyio

TEXTS = ["hi", "", '"quoted"\n', "日本語", "\u2028 \\ </script>", "x" * 5000]


def meta(model: str = "m") -> StreamMeta:
    return StreamMeta(id="s1", model=model, protocol="openai", created=1700000000)


async def test_read_batches_gives_ready_events_at_once_then_live() -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    for i in range(5):
        await journal.append("s1", TextDelta(text=str(i)))
    batches = journal.read_batches("s1")
    first = await anext(batches)
    assert [e.seq for e in first] == [0, 1, 2, 3, 4]

    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # nothing new: the reader waits
    await journal.append("s1", TextDelta(text="5"))
    await journal.append("s1", TextDelta(text="6"))
    # Both appends happened before the reader ran: it gets them together.
    assert [e.seq for e in await asyncio.wait_for(waiting, 2)] == [5, 6]

    await journal.append("s1", StreamCompleted())
    last = await asyncio.wait_for(anext(batches), 2)
    assert [type(e) for e in last] == [StreamCompleted]
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


async def test_read_batches_after_and_replay_equal_read() -> None:
    journal = MemoryJournal()
    await journal.create(meta())
    for i in range(600):  # more than one batch's worth
        await journal.append("s1", TextDelta(text=str(i)))
    await journal.append("s1", StreamCompleted())
    for after in (-1, 3, 598, 599):
        flat = [e.seq async for batch in journal.read_batches("s1", after) for e in batch]
        assert flat == [e.seq async for e in journal.read("s1", after)]
        assert flat[-1] == 600


class _OneByOne(Journal):
    """A journal with only ``read``: ``read_batches`` falls back to one event per batch."""

    def __init__(self, inner: MemoryJournal) -> None:
        self.inner = inner

    async def create(self, meta: StreamMeta) -> None:
        await self.inner.create(meta)

    async def append(self, stream_id: str, event: Event) -> int:
        return await self.inner.append(stream_id, event)

    def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        return self.inner.read(stream_id, after)

    async def meta(self, stream_id: str) -> StreamMeta:
        return await self.inner.meta(stream_id)


async def test_default_read_batches_yields_single_events() -> None:
    journal = _OneByOne(MemoryJournal())
    await journal.create(meta())
    for i in range(3):
        await journal.append("s1", TextDelta(text=str(i)))
    await journal.append("s1", StreamCompleted())
    batches = [[e.seq for e in b] async for b in journal.read_batches("s1")]
    assert batches == [[0], [1], [2], [3]]


@pytest.mark.parametrize("model", ["m", 'we"ird "content":"" \\ model', "日本"])
def test_spliced_text_chunk_is_the_dict_json(model: str) -> None:
    renderer = Renderer(meta(model))
    for text in TEXTS:
        [payload] = renderer.render(TextDelta(text=text))
        assert isinstance(payload, bytes)
        assert payload == orjson.dumps(renderer._chunk({"content": text}))
        assert orjson.loads(payload)["choices"][0]["delta"] == {"content": text}


def test_event_size_shortcut_counts_the_json_bytes() -> None:
    for text in [*TEXTS, 'quote " backslash \\ newline \n é 漢 \U0001f600']:
        for seq in (-1, 0, 7, 123456):
            event = TextDelta(text=text)
            event.seq = seq
            assert event_size(event) == len(orjson.dumps(event.to_dict()))
    others: list[Event] = [
        ToolCallDelta(index=0, arguments_delta='{"a": 1}'),
        Usage(prompt_tokens=3, completion_tokens=4),
        Progress(stage="connecting"),
        StreamCompleted(finish_reason="stop"),
    ]
    for seq, event in enumerate(others):
        event.seq = seq * 997
        assert event_size(event) == len(orjson.dumps(event.to_dict())), event


async def test_gateway_hands_the_reader_the_calls_events_after_the_first_token() -> None:
    """``Gateway.stream``'s iterator: the attempts until content, then the call's own events
    directly. The attempts end at the first token (no generator of theirs stays suspended
    for the stream's life); closing the relay closes the call's events, then the call."""
    from tokenwire.gateway import _Relayed

    closed: list[str] = []

    async def call_events() -> AsyncIterator[Event]:
        try:
            for text in ("a", "b", "c"):
                yield TextDelta(text=text)
        finally:
            closed.append("events")

    class Call:
        async def aclose(self) -> None:
            closed.append("call")

    async def attempts(relay: _Relayed) -> AsyncIterator[Event]:
        try:
            yield Progress(stage="connecting")
            events = call_events()
            async for event in events:
                relay.call, relay.events, relay.first = Call(), events, event  # type: ignore[assignment]
                return  # content started: handed over
        finally:
            closed.append("attempts")

    relay = _Relayed()
    relay.attempts = attempts(relay)
    got = [await anext(relay), await anext(relay), await anext(relay)]
    assert isinstance(got[0], Progress)
    assert [e.text for e in got[1:]] == ["a", "b"]  # type: ignore[attr-defined]
    assert closed == ["attempts"]  # the attempts ended at the first token
    await relay.aclose()
    assert closed == ["attempts", "events", "call"]
    with pytest.raises(StopAsyncIteration):
        await anext(relay)
