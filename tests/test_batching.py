"""Continuous batching in the embedded backend, on the real model.

Concurrent streams decode in one batch (their tokens interleave in time), a seeded stream
gives the same text batched as alone, Stop frees a sequence slot at once for a queued
request, a long prompt is prefilled in chunks while others keep decoding, and the queue
still answers with positions and 429.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokenwire.backends.llamacpp import LlamaCppBackend
from tokenwire.cancel import CancelToken
from tokenwire.errors import Overloaded
from tokenwire.events import Event, Progress, TextDelta, Usage
from tokenwire.requests import ChatRequest, Message, SamplingParams

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[LlamaCppBackend]:
    model = LlamaCppBackend(parallel=4, max_queue=2, prefill_chunk=32)
    await model.start()
    yield model
    await model.close()


def request(content: str, *, max_tokens: int = 12, **sampling: object) -> ChatRequest:
    params = SamplingParams(max_tokens=max_tokens, **sampling)  # type: ignore[arg-type]
    return ChatRequest(
        model="default", messages=[Message(role="user", content=content)], sampling=params
    )


async def collect(
    model: LlamaCppBackend, chat: ChatRequest, cancel: CancelToken | None = None
) -> list[tuple[float, Event]]:
    cancel = cancel or CancelToken()
    return [(time.perf_counter(), event) async for event in model.stream(chat, cancel)]


def text_of(events: list[tuple[float, Event]]) -> str:
    return "".join(e.text for _, e in events if isinstance(e, TextDelta))


PROMPTS = [f"Write one sentence about the number {n}." for n in range(4)]


@pytest.mark.parametrize("split_below", [1, 99], ids=["one-batched-decode", "one-per-sequence"])
async def test_concurrent_seeded_streams_all_complete_with_their_solo_text(
    backend: LlamaCppBackend, split_below: int
) -> None:
    """Both ways of running a decode step (one batched ``llama_decode``, or one per sequence
    where the calibration found batching slower) give every stream its solo text, together."""
    engine = backend._engine
    assert engine is not None
    calibrated, engine.split_below = engine.split_below, split_below
    apart = engine.steps_apart
    chats = [request(p, temperature=0.9, seed=1000 + i) for i, p in enumerate(PROMPTS)]
    try:
        solo = [text_of(await collect(backend, chat)) for chat in chats]
        batched = await asyncio.gather(*(collect(backend, chat) for chat in chats))
    finally:
        engine.split_below = calibrated
    assert (engine.steps_apart > apart) == (split_below > len(PROMPTS))
    for events, alone in zip(batched, solo, strict=True):
        assert events[-1][1].type == "stream.completed"
        assert text_of(events) == alone
    # The streams ran together: every stream's first token came before any stream ended.
    firsts = [next(t for t, e in events if isinstance(e, TextDelta)) for events in batched]
    ends = [events[-1][0] for events in batched]
    assert max(firsts) < min(ends)
    assert backend.queue.running == 0 and backend.queue.waiting == 0


async def test_stop_frees_a_slot_for_the_queued_request_within_a_token(
    backend: LlamaCppBackend,
) -> None:
    cancels = [CancelToken() for _ in range(4)]
    long = [
        asyncio.ensure_future(
            collect(backend, request(p, max_tokens=400, temperature=0), cancels[i])
        )
        for i, p in enumerate(PROMPTS)
    ]
    while backend.queue.running < 4:
        await asyncio.sleep(0.01)
    # All four sequences are busy: a fifth request waits at position 1.
    waiting_events: list[Event] = []
    waiter_cancel = CancelToken()

    async def wait_in_queue() -> None:
        async for event in backend.stream(request("Say hi.", max_tokens=3), waiter_cancel):
            waiting_events.append(event)

    waiter = asyncio.ensure_future(wait_in_queue())
    while not waiting_events:
        await asyncio.sleep(0.01)
    assert isinstance(waiting_events[0], Progress) and waiting_events[0].stage == "queued"
    assert waiting_events[0].position == 1
    # Beyond the queue's bound (2 waiting): 429 before any event.
    second_waiter = asyncio.ensure_future(collect(backend, request("x", max_tokens=1)))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        await collect(backend, request("y", max_tokens=1))

    # Stop one running stream: it ends within one token and the waiter is admitted.
    await asyncio.sleep(0.3)
    stopped_at = time.perf_counter()
    cancels[0].cancel("stop")
    stopped = await asyncio.wait_for(long[0], 30)
    after_stop = [e for t, e in stopped if t > stopped_at and isinstance(e, TextDelta)]
    assert len(after_stop) <= 1
    assert stopped[-1][1].type == "usage"  # a cancelled stream has no stream.completed
    await asyncio.wait_for(waiter, 60)
    stages = [e.stage for e in waiting_events if isinstance(e, Progress)]
    assert stages[-1] == "prefill" and waiting_events[-1].type == "stream.completed"
    for cancel in cancels[1:]:
        cancel.cancel("stop")
    await asyncio.wait_for(asyncio.gather(*long[1:], second_waiter), 60)
    assert backend.queue.running == 0 and backend.queue.waiting == 0


async def test_a_long_prompt_is_prefilled_while_another_stream_keeps_decoding(
    backend: LlamaCppBackend,
) -> None:
    running = asyncio.ensure_future(
        collect(
            backend,
            request("Write a very long story about a dragon and a knight.", max_tokens=400),
        )
    )
    while backend.queue.running < 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum"] * 120)
    joined_at = time.perf_counter()
    late = await collect(backend, request(long_prompt + "\nName one.", max_tokens=2))
    first_late = next(t for t, e in late if isinstance(e, TextDelta))
    events = await running
    tokens_meanwhile = [
        e for t, e in events if joined_at < t < first_late and isinstance(e, TextDelta)
    ]
    assert events[-1][0] > first_late, "the running stream ended before the late one began"
    # ~700 prompt tokens in chunks of 32: the running stream got tokens in between.
    assert len(tokens_meanwhile) >= 5
    assert events[-1][1].type == "stream.completed"


@pytest.mark.timeout(120)
def test_requantized_weights_are_made_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenwire.backends.llamacpp import default_model_path, requantized_model
    from tokenwire.errors import BackendError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = requantized_model(default_model_path(), "q4_0")
    assert made.is_file() and made.parent == tmp_path / "tokenwire"
    assert made.read_bytes()[:4] == b"GGUF"
    stamp = made.stat().st_mtime_ns
    assert requantized_model(default_model_path(), "q4_0") == made
    assert made.stat().st_mtime_ns == stamp  # not made again
    assert not list(made.parent.glob("*.partial"))
    with pytest.raises(BackendError):
        requantized_model(default_model_path(), "q2_k")


async def test_streams_keep_their_solo_text_when_a_lower_sequence_leaves(
    backend: LlamaCppBackend,
) -> None:
    """A stream that stops early leaves a gap in the sequence ids (filled with a throwaway
    token each step); the streams after it must not notice."""
    chats = [request(p, max_tokens=24, temperature=0.8, seed=7 + i) for i, p in enumerate(PROMPTS)]
    solo = [text_of(await collect(backend, chat)) for chat in chats[1:3]]
    first = CancelToken()
    runs = [
        asyncio.ensure_future(collect(backend, chat, first if i == 0 else None))
        for i, chat in enumerate(chats[:3])
    ]
    while backend._engine is not None and not any(s.completed for s in backend._engine._active):
        await asyncio.sleep(0.005)
    first.cancel("stop")
    results = await asyncio.wait_for(asyncio.gather(*runs), 60)
    assert results[0][-1][1].type == "usage"  # cancelled: no stream.completed
    assert [text_of(events) for events in results[1:]] == solo


async def test_grammar_checks_the_pick_and_masks_only_on_rejection(
    backend: LlamaCppBackend,
) -> None:
    """Constrained sampling checks the chain's pick against the grammar and masks the whole
    vocabulary only when the grammar refuses it. A schema the model would never follow by
    itself forces refusals, and every seeded stream still gives schema-valid JSON, batched."""
    import json

    from tokenwire.requests import ResponseFormat

    schema = {
        "type": "object",
        "properties": {"code": {"enum": ["zq-17", "xv-99"]}, "n": {"type": "integer"}},
        "required": ["code", "n"],
        "additionalProperties": False,
    }
    engine = backend._engine
    assert engine is not None
    before = engine.grammar_rejections

    async def constrained(seed: int) -> str:
        chat = request("Tell me about the sea.", max_tokens=48, temperature=0.9, seed=seed)
        chat.response_format = ResponseFormat(type="json_schema", schema=schema)
        return text_of(await collect(backend, chat))

    texts = await asyncio.wait_for(asyncio.gather(*(constrained(s) for s in (1, 2, 3))), 120)
    for text in texts:
        value = json.loads(text)
        assert value["code"] in ("zq-17", "xv-99") and isinstance(value["n"], int)
    assert engine.grammar_rejections > before


async def _answer(backend: LlamaCppBackend, messages: list[Message]) -> tuple[str, Usage]:
    chat = ChatRequest(
        model="default",
        messages=messages,
        sampling=SamplingParams(max_tokens=16, temperature=0.0),
    )
    events = await collect(backend, chat)
    usage = next(e for _, e in events if isinstance(e, Usage))
    return text_of(events), usage


async def test_the_next_turn_reuses_the_conversations_cached_prefix(
    backend: LlamaCppBackend,
) -> None:
    """A finished stream's KV cells stay as a cached prefix: the next turn of the same
    conversation is prefilled only from where its prompt differs, on the same sequence id
    or copied from another one, and answers exactly as a cold model does."""
    system = "You are a terse assistant. " + "Answer in one short sentence. " * 12
    first = [Message(role="system", content=system), Message(role="user", content="Rain?")]
    # Turn 1 runs beside a longer stream, so it lands on a higher sequence id; turn 2 then
    # gets the lowest free id and must copy turn 1's cells from the other id.
    engine = backend._engine
    assert engine is not None
    copies = engine.prefix_copies
    other = request("Count from one to twenty in words.", max_tokens=40, temperature=0.0)
    others = backend.stream(other, CancelToken())
    async for event in others:  # the other stream holds a sequence id before turn 1 joins
        if isinstance(event, TextDelta):
            break
    answer, usage1 = await asyncio.wait_for(_answer(backend, first), 120)
    async for _ in others:
        pass
    second = [
        *first,
        Message(role="assistant", content=answer),
        Message(role="user", content="Snow?"),
    ]
    text, usage2 = await asyncio.wait_for(_answer(backend, second), 120)
    assert usage2.cached_tokens is not None
    assert usage2.cached_tokens >= usage1.prompt_tokens - 4  # the whole first prompt, or nearly
    assert usage2.cached_tokens < usage2.prompt_tokens
    assert engine.prefix_copies == copies + 1
    cold = LlamaCppBackend(parallel=1, warmup=False, prompt_cache=False)  # --no-prompt-cache
    await cold.start()
    try:
        cold_text, cold_usage = await asyncio.wait_for(_answer(cold, second), 120)
        again, again_usage = await asyncio.wait_for(_answer(cold, second), 120)
    finally:
        await cold.close()
    assert cold_usage.cached_tokens == again_usage.cached_tokens == 0
    assert again == cold_text
    assert cold_usage.prompt_tokens == usage2.prompt_tokens
    assert text == cold_text
