"""Guards on partial output: the stream stops within one token of the match."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tokenwire.backends.llamacpp import LlamaCppBackend
from tokenwire.cancel import CancelToken
from tokenwire.events import Event, GuardTriggered, StreamCompleted, TextDelta
from tokenwire.requests import ChatRequest
from tokenwire.stages.guards import Guard, Guards, parse_guard

from .scripted import serve_app_in_thread
from .stage_support import EventScript, chat, run_stream, text_events

SSN = parse_guard(r"ssn=\d{3}-\d{2}-\d{4}")


@pytest.mark.anyio
async def test_regex_guard_matches_across_deltas_and_stops_the_backend() -> None:
    pieces = ["Hello wor", "ld, my SS", "N is 123-4", "5-6789 and", " more", *(["x"] * 20)]
    backend = EventScript(steps=[text_events(*pieces)])
    events = await run_stream(backend, chat(), [Guards([SSN])])
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    # Deltas stream until one completes a match; that one is withheld (a guard stops
    # generation; it does not redact what already went out).
    assert texts == ["Hello wor", "ld, my SS", "N is 123-4"]
    fired = [e for e in events if isinstance(e, GuardTriggered)]
    assert len(fired) == 1
    assert (fired[0].guard, fired[0].match) == ("ssn", "123-45-6789")
    assert fired[0].position == len("Hello world, my SSN is ")
    assert isinstance(events[-1], StreamCompleted)
    assert events[-1].finish_reason == "content_filter"
    assert events.index(fired[0]) == len(events) - 2
    assert backend.yielded == [4] and backend.closed == [True]


@pytest.mark.anyio
async def test_predicate_guard_sees_the_whole_text() -> None:
    def too_many_exclamations(text: str) -> str | None:
        return "!!!" if text.count("!") >= 3 else None

    backend = EventScript(steps=[text_events("Wow!", " Great!", " Yes!", " More")])
    guards = Guards([Guard(name="shouting", predicate=too_many_exclamations)])
    events = await run_stream(backend, chat(), [guards])
    fired = next(e for e in events if isinstance(e, GuardTriggered))
    assert fired.guard == "shouting"
    assert events[-1].type == "stream.completed"
    assert backend.yielded == [3]


@pytest.mark.anyio
async def test_no_match_passes_everything() -> None:
    backend = EventScript(steps=[text_events("all", " fine")])
    events = await run_stream(backend, chat(), [Guards([SSN])])
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["all", " fine"]
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "stop"


class Tap:
    """Innermost stage: counts the tokens the backend hands on, and sees it closed."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.closed_after: int | None = None

    def __call__(
        self, events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        return self._tap(events)

    async def _tap(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    self.tokens.append(event.text)
                yield event
        finally:
            self.closed_after = len(self.tokens)
            await events.aclose()  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_guard_on_the_embedded_model_fires_within_one_token() -> None:
    backend = LlamaCppBackend(warmup=False, n_ctx=1024)
    await backend.start()
    try:
        request = chat("Tell me a story about a dragon.", temperature=0.0, max_tokens=40)
        tap = Tap()
        free = await run_stream(backend, request, [tap])
        assert free[-1].type == "stream.completed"
        # Guard on a word the model writes early (greedy decoding is deterministic).
        tokens = tap.tokens
        target = next(i for i, t in enumerate(tokens) if i >= 4 and re.search(r"\w{3,}", t))
        word = re.search(r"\w{3,}", tokens[target])
        assert word is not None
        prefix = "".join(tokens[:target])
        pattern = re.escape(word.group())
        assert not re.search(pattern, prefix), "pick a word that does not occur earlier"

        guarded_tap = Tap()
        guards = Guards([Guard(name="early-word", pattern=re.compile(pattern))])
        events = await run_stream(backend, request, [guarded_tap, guards])
    finally:
        await backend.close()
    fired = [e for e in events if isinstance(e, GuardTriggered)]
    assert len(fired) == 1 and fired[0].guard == "early-word"
    assert isinstance(events[-1], StreamCompleted)
    assert events[-1].finish_reason == "content_filter"
    # The token that completed the match was the last one taken from the model, and the
    # backend was closed right there: no token after the match was decoded for the client.
    assert guarded_tap.tokens == tokens[: target + 1]
    assert guarded_tap.closed_after == target + 1
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == "".join(tokens)[: fired[0].position]


@pytest.mark.timeout(60)
def test_guard_over_http_for_openai_and_native_clients() -> None:
    backend = EventScript(steps=[text_events("Call me at ", "555-12", "-3456 now", " please")])
    patterns = [r"phone=\d{3}-\d{2}-\d{4}"]
    with serve_app_in_thread(backend, guard=patterns, disconnect_grace=0) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Call me at 555-12"  # the delta that completed the match is withheld
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", f"{url}/v1/streams", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line.startswith("event:")]
        assert lines[-2:] == ["event: guard.triggered", "event: stream.completed"]
