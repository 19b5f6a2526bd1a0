"""Coalescing: opt-in merging of text deltas by word, line or a maximum delay."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from tokenwire.errors import InvalidRequest
from tokenwire.events import Event, StreamCompleted, TextDelta, Usage
from tokenwire.stages.coalesce import CoalesceSpec, coalesce, parse_coalesce

from .conftest import tokenwire_server

pytestmark = pytest.mark.timeout(60)


async def source(pieces: list[str], gap: float = 0.0) -> AsyncIterator[Event]:
    import asyncio

    for piece in pieces:
        if gap:
            await asyncio.sleep(gap)
        yield TextDelta(text=piece)
    yield Usage(prompt_tokens=1, completion_tokens=len(pieces))
    yield StreamCompleted()


async def frames(
    pieces: list[str], spec: CoalesceSpec, gap: float = 0.0
) -> list[tuple[float, Event]]:
    started = time.monotonic()
    return [(time.monotonic() - started, e) async for e in coalesce(source(pieces, gap), spec)]


def texts(out: list[tuple[float, Event]]) -> list[str]:
    return [e.text for _, e in out if isinstance(e, TextDelta)]


PIECES = ["Hel", "lo", " wor", "ld", ", how", " are", " you?\n", "Fine", ".\nBye"]


@pytest.mark.anyio
async def test_word_mode_never_splits_a_word_and_keeps_text_and_order() -> None:
    out = await frames(PIECES, parse_coalesce("word"))
    got = texts(out)
    assert "".join(got) == "".join(PIECES)
    assert got == ["Hello ", "world, ", "how ", "are you?\n", "Fine.\n", "Bye"]
    # Held text leaves before usage and the terminal event.
    assert [e.type for _, e in out][-3:] == ["text.delta", "usage", "stream.completed"]


@pytest.mark.anyio
async def test_line_mode_sends_whole_lines() -> None:
    got = texts(await frames(PIECES, parse_coalesce("line")))
    assert got == ["Hello world, how are you?\n", "Fine.\n", "Bye"]


@pytest.mark.anyio
async def test_max_delay_bounds_frames_and_holding_time() -> None:
    pieces = [f"t{i} " for i in range(30)]
    out = await frames(pieces, parse_coalesce({"max_delay_ms": 100}), gap=0.01)
    got = texts(out)
    assert "".join(got) == "".join(pieces)
    total = out[-1][0]
    # Tokens every 10 ms merged into frames at most ~100 ms apart: far fewer frames.
    assert 2 <= len(got) <= len(pieces) // 3
    assert len(got) <= total / 0.1 + 2


@pytest.mark.anyio
async def test_a_slow_upstream_is_not_held_past_the_delay() -> None:
    # Tokens 300 ms apart, delay 50 ms: each token leaves on its own, ~50 ms after arriving,
    # not when the next one comes.
    out = await frames(["a", "b", "c"], parse_coalesce({"max_delay_ms": 50}), gap=0.3)
    deltas = [(t, e.text) for t, e in out if isinstance(e, TextDelta)]
    assert [text for _, text in deltas] == ["a", "b", "c"]
    for index, (at, _) in enumerate(deltas[:2]):
        arrived = 0.3 * (index + 1)
        assert arrived + 0.04 <= at < arrived + 0.25
    # The last one leaves with the end of the stream, without waiting for the delay.
    assert 0.9 <= deltas[2][0] < 0.9 + 0.25


def test_parse_accepts_the_documented_forms_and_rejects_others() -> None:
    assert parse_coalesce(None).off and parse_coalesce("off").off
    assert parse_coalesce("word").mode == "word"
    assert parse_coalesce("50ms") == CoalesceSpec(max_delay=0.05)
    assert parse_coalesce({"mode": "line", "max_delay_ms": 200}) == CoalesceSpec("line", 0.2)
    for bad in ("banana", {"max_delay_ms": 0}, {"max_delay_ms": "5"}, {"mode": "x"}, 5, True):
        with pytest.raises(InvalidRequest) as info:
            parse_coalesce(bad)
        assert info.value.param == "stream_options.coalesce"


def stream_deltas(url: str, body: dict[str, object]) -> list[str]:
    out: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = orjson.loads(line[6:]).get("choices") or [{}]
                content = choices[0].get("delta", {}).get("content")
                if content:
                    out.append(content)
    return out


@pytest.mark.timeout(120)
def test_real_model_default_is_one_frame_per_token_and_word_mode_merges() -> None:
    with tokenwire_server("--disconnect-grace", "0") as server:
        body = {
            "model": "default",
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": 40,
            "messages": [{"role": "user", "content": "Describe the sea in two sentences."}],
        }
        plain = stream_deltas(server.url, body)
        merged = stream_deltas(
            server.url, {**body, "stream_options": {"include_usage": True, "coalesce": "word"}}
        )
        assert "".join(merged) == "".join(plain)
        assert len(merged) < len(plain)
        assert all(piece[-1].isspace() for piece in merged[:-1])
        bad = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={**body, "stream_options": {"coalesce": "banana"}},
            timeout=10,
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "stream_options.coalesce"
