"""Response cache: deterministic requests answered by replaying a finished stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cache import ResponseCache
from tokenwire.cancel import CancelToken
from tokenwire.errors import BackendError
from tokenwire.events import Event, Progress, TextDelta
from tokenwire.journal import MemoryJournal
from tokenwire.requests import ChatRequest, Message, SamplingParams
from tokenwire.router import Router
from tokenwire.streams import StreamManager

from .conftest import tokenwire_server
from .perf_backends import PacedBackend


def chat_body(content: str, **extra: object) -> dict[str, object]:
    return {"model": "default", "messages": [{"role": "user", "content": content}], **extra}


def native_events(url: str, body: dict[str, object]) -> tuple[httpx.Headers, list[str], str]:
    """(headers, event types, text) of one native SSE stream."""
    types: list[str] = []
    text = ""
    with httpx.stream("POST", f"{url}/v1/streams", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        headers = response.headers
        for line in response.iter_lines():
            if line.startswith("event: "):
                types.append(line[7:])
            elif line.startswith("data: ") and types and types[-1] == "text.delta":
                text += orjson.loads(line[6:])["text"]
    return headers, types, text


@pytest.mark.timeout(120)
def test_identical_deterministic_request_is_a_replay_of_the_finished_stream() -> None:
    with tokenwire_server("--cache", "deterministic", "--disconnect-grace", "0") as server:
        body = chat_body("Name three colors.", temperature=0, max_tokens=20)
        headers1, types1, text1 = native_events(server.url, body)
        assert headers1["x-tokenwire-cache"] == "miss"
        assert types1[-1] == "stream.completed" and text1

        started = time.perf_counter()
        headers2, types2, text2 = native_events(server.url, body)
        assert headers2["x-tokenwire-cache"] == "hit"
        assert headers2["x-stream-id"] != headers1["x-stream-id"]
        assert text2 == text1
        # Same content events, in the same order; the queue/prefill steps are not replayed.
        content = [t for t in types1 if t != "progress"]
        assert [t for t in types2 if t != "progress"] == content
        assert "progress" in types2  # the replay announces itself

        # The replayed stream is a real stream: resumable after any seq.
        resumed = httpx.get(f"{server.url}/v1/streams/{headers2['x-stream-id']}?after=3")
        assert resumed.status_code == 200 and "stream.completed" in resumed.text
        # How it was answered is the stream's metadata: a resume says it too.
        assert resumed.headers["x-tokenwire-cache"] == "hit"
        assert time.perf_counter() - started < 30

        # OpenAI non-streaming answer from the cache, header included.
        plain = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert plain.headers["x-tokenwire-cache"] == "hit"
        assert plain.json()["choices"][0]["message"]["content"] == text1

        # A different parameter is a different key.
        other, _, _ = native_events(server.url, {**body, "max_tokens": 19})
        assert other["x-tokenwire-cache"] == "miss"

        # Sampled requests (no seed) are not cached in deterministic mode.
        sampled = chat_body("Name three colors.", temperature=0.8, max_tokens=5)
        h1, _, _ = native_events(server.url, sampled)
        h2, _, _ = native_events(server.url, sampled)
        assert "x-tokenwire-cache" not in h1 and "x-tokenwire-cache" not in h2
        # A fixed seed makes a sampled request deterministic.
        seeded = {**sampled, "seed": 7}
        first_seeded = native_events(server.url, seeded)
        assert first_seeded[0]["x-tokenwire-cache"] == "miss"
        hit, _, seeded_text = native_events(server.url, seeded)
        assert hit["x-tokenwire-cache"] == "hit" and seeded_text == first_seeded[2]

        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'tokenwire_cache_lookups_total{result="hit"} 3.0' in metrics


@pytest.mark.timeout(120)
def test_cancelled_stream_is_not_cached() -> None:
    with tokenwire_server("--cache", "deterministic", "--disconnect-grace", "0") as server:
        body = chat_body("Write a long story about a castle.", temperature=0, max_tokens=300)
        with httpx.stream("POST", f"{server.url}/v1/streams", json=body, timeout=60) as response:
            assert response.headers["x-tokenwire-cache"] == "miss"
            stream_id = response.headers["x-stream-id"]
            lines = response.iter_lines()
            for line in lines:
                if line == "event: text.delta":
                    break
            httpx.post(f"{server.url}/v1/streams/{stream_id}/cancel", timeout=10)
            assert "event: stream.cancelled" in list(lines)
        with httpx.stream("POST", f"{server.url}/v1/streams", json=body, timeout=60) as response:
            assert response.headers["x-tokenwire-cache"] == "miss"


# -- the cache on its own, with time under control --------------------------------------


def request(content: str = "hi", **sampling: object) -> ChatRequest:
    params = SamplingParams(**{"temperature": 0.0, **sampling})  # type: ignore[arg-type]
    return ChatRequest(
        model="default", messages=[Message(role="user", content=content)], sampling=params
    )


async def run(manager: StreamManager, chat: ChatRequest) -> tuple[list[Event], float]:
    started = time.perf_counter()
    meta = await manager.start(chat, protocol="native")
    events = [event async for event in manager.read(meta.id)]
    return events, time.perf_counter() - started


@dataclass
class FailingBackend(Backend):
    calls: int = 0

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("failing")]

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        self.calls += 1
        yield Progress(stage="prefill")
        yield TextDelta(text="partial")
        raise BackendError("boom")


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_failed_stream_is_not_cached() -> None:
    backend = FailingBackend()
    cache = ResponseCache(mode="deterministic")
    manager = StreamManager(Router(backend), MemoryJournal(), stages=[cache.stage])
    for _ in range(2):
        events, _ = await run(manager, request())
        assert events[-1].type == "stream.failed"
    assert backend.calls == 2 and len(cache) == 0
    await manager.close()


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_paced_replay_keeps_the_original_timing_and_instant_does_not() -> None:
    backend = PacedBackend(pieces=["a", "b", "c", "d", "e", "f"], gap=0.05)
    for replay, check in (("paced", "slow"), ("instant", "fast")):
        cache = ResponseCache(mode="deterministic", replay=replay)  # type: ignore[arg-type]
        manager = StreamManager(Router(backend), MemoryJournal(), stages=[cache.stage])
        chat = request(replay)
        assert (found := cache.lookup(chat)) is not None and found.status == "miss"
        _, original_s = await run(manager, chat)
        again = request(replay)
        assert (found := cache.lookup(again)) is not None and found.status == "hit"
        replayed, replay_s = await run(manager, again)
        text = [e.text for e in replayed if isinstance(e, TextDelta)]
        assert text == ["a", "b", "c", "d", "e", "f"]
        assert [e.seq for e in replayed] == list(range(len(replayed)))
        assert original_s >= 0.25
        if check == "slow":
            assert replay_s >= 0.8 * 0.25
        else:
            assert replay_s < original_s / 2
        await manager.close()
    assert backend.calls == 2  # once per mode; the replays never called it


def test_ttl_and_size_bounds() -> None:
    now = [0.0]
    cache = ResponseCache(mode="deterministic", ttl=10, max_entries=2, clock=lambda: now[0])
    a, b, c = (cache.key(request(x)) for x in "abc")
    cache.put(a, [(0.0, TextDelta(text="a"))])
    cache.put(b, [(0.0, TextDelta(text="b"))])
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, [(0.0, TextDelta(text="c"))])
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    now[0] = 10.0
    assert cache.get(a) is None and len(cache) == 1
    small = ResponseCache(mode="deterministic", max_events=3)
    small.put(a, [(0.0, TextDelta(text="x"))] * 2)
    small.put(b, [(0.0, TextDelta(text="y"))] * 2)
    assert len(small) == 1 and small.get(b) is not None
    small.put(c, [(0.0, TextDelta(text="z"))] * 4)  # larger than the whole cache: not stored
    assert small.get(c) is None


def test_keys_ignore_delivery_options_but_not_content() -> None:
    base = request("hello")
    coalesced = request("hello")
    coalesced.extra["coalesce"] = "word"
    coalesced.include_usage = True
    assert ResponseCache.key(base) == ResponseCache.key(coalesced)
    assert ResponseCache.key(base) != ResponseCache.key(request("hello!"))
    assert ResponseCache.key(base) != ResponseCache.key(request("hello", max_tokens=5))
    deterministic = ResponseCache(mode="deterministic")
    assert deterministic.cacheable(request(temperature=0.0))
    assert deterministic.cacheable(request(temperature=0.9, seed=3))
    assert not deterministic.cacheable(request(temperature=0.9))
    assert ResponseCache(mode="all").cacheable(request(temperature=0.9))
    assert not ResponseCache(mode="off").cacheable(request())
