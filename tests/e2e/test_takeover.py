"""Takeover and zero-downtime restarts: a stream outlives the replica producing it.

Real replicas (``tokenwire serve`` subprocesses, the embedded model, greedy decoding) share a
real Redis. When the producing replica is SIGKILLed mid-answer, a surviving replica claims the
stream and continues it into the same log (prompt + partial answer prefilled); on SIGTERM the
replica hands its streams over at once. Readers see contiguous sequence numbers, one
``progress`` event with stage ``takeover``, exactly one terminal event, and usage that adds
up; the text is the uninterrupted answer's (or, where re-tokenizing the partial answer made
the model choose differently, a continuation of exactly the text that streamed before).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tokenwire.client import Client
from tokenwire.events import (
    Event,
    Progress,
    StreamCompleted,
    StreamStarted,
    TextDelta,
    Usage,
)

from ..conftest import RunningServer, tokenwire_server
from ..sse_reader import payload_of, read_segment, text_of
from .services import RedisServer, nginx, redis_server

pytestmark = [pytest.mark.e2e]

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to sing."}]
GREEDY = {"temperature": 0, "max_tokens": 160}


def replica_args(redis: RedisServer) -> list[str]:
    return ["--journal", redis.url, "--threads", "1", "--heartbeat", "1"]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


@pytest.fixture(scope="module")
def survivor(redis: RedisServer) -> Iterator[RunningServer]:
    with tokenwire_server(*replica_args(redis)) as running:
        yield running


@pytest.fixture(scope="module")
def reference(survivor: RunningServer) -> tuple[str, Usage]:
    """The uninterrupted answer (greedy: the same on every run and replica)."""
    with Client(survivor.url) as client:
        result = client.chat.create(messages=STORY, **GREEDY)
    assert result.usage is not None and result.finish_reason == "length"
    return result.text, result.usage


def start_on(server: RunningServer, cut_after: int) -> tuple[str, int, str]:
    """Start the stream on ``server`` and drop the connection after ``cut_after`` bytes (the
    replica keeps generating); returns its id, the last seq read and the text so far."""
    with httpx.Client(timeout=60) as http:
        body = {"model": "default", "messages": STORY, **GREEDY}
        segment = read_segment(
            http, "POST", f"{server.url}/v1/streams", body=body, cut_after=cut_after
        )
    assert segment.stream_id is not None and not segment.finished
    last = max(f.id for f in segment.frames if f.id is not None)
    return segment.stream_id, last, "".join(text_of(f) for f in segment.frames)


def journal_of(server: RunningServer, stream_id: str) -> list[dict[str, Any]]:
    with httpx.Client(timeout=60) as http:
        segment = read_segment(http, "GET", f"{server.url}/v1/streams/{stream_id}?after=-1")
    assert segment.finished
    return [payload_of(f) for f in segment.frames]


def assert_taken_over(
    events: list[dict[str, Any]], reference: tuple[str, Usage], before: str
) -> str:
    """The whole log of a taken-over stream: well formed, one takeover, usage that adds up.
    Returns how its text compares with the uninterrupted answer."""
    assert [e["seq"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds.count(StreamStarted.type) == 1 and kinds[0] == StreamStarted.type
    assert kinds[-1] == StreamCompleted.type and events[-1]["finish_reason"] == "length"
    takeovers = [e for e in events if e["type"] == Progress.type and e["stage"] == "takeover"]
    assert len(takeovers) == 1
    seam = events.index(takeovers[0])
    streamed = "".join(e["text"] for e in events[:seam] if e["type"] == TextDelta.type)
    text = "".join(e["text"] for e in events if e["type"] == TextDelta.type)
    answer, usage = reference
    # Nothing streamed before the takeover is lost or repeated, and the answer goes on.
    assert streamed.startswith(before) and answer.startswith(streamed)
    assert text.startswith(streamed) and len(text) > len(streamed)
    (final_usage,) = [e for e in events if e["type"] == Usage.type]
    assert final_usage["prompt_tokens"] == usage.prompt_tokens
    assert final_usage["completion_tokens"] == usage.completion_tokens == GREEDY["max_tokens"]
    return "identical" if text == answer else f"continued differently after {len(streamed)}"


@pytest.mark.timeout(240)
def test_a_killed_producers_stream_is_continued_by_another_replica(
    redis: RedisServer, survivor: RunningServer, reference: tuple[str, Usage]
) -> None:
    with tokenwire_server(*replica_args(redis)) as doomed:
        stream_id, last, before = start_on(doomed, cut_after=1500)
        followed: list[Event] = []
        # Follow live on the survivor, and kill the producer a few events later.
        with Client(survivor.url) as client:
            for event in client.streams.resume(stream_id, after=last):
                followed.append(event)
                if len(followed) == 3:
                    os.kill(doomed.process.pid, signal.SIGKILL)
        doomed.process.wait(timeout=10)
    assert [e.seq for e in followed] == list(range(last + 1, last + 1 + len(followed)))
    assert sum(e.terminal for e in followed) == 1 and isinstance(followed[-1], StreamCompleted)
    events = journal_of(survivor, stream_id)
    print("takeover after SIGKILL:", assert_taken_over(events, reference, before))
    # What the follower saw live is what the log holds.
    assert [e.to_dict() for e in followed] == events[last + 1 :]


@pytest.mark.timeout(240)
def test_sigterm_hands_streams_over_at_once(
    redis: RedisServer, survivor: RunningServer, reference: tuple[str, Usage]
) -> None:
    with (
        tokenwire_server(*replica_args(redis)) as leaving,
        nginx([leaving.port, survivor.port]) as lb,
    ):
        stream_id, last, before = start_on(leaving, cut_after=1500)
        followed: list[Event] = []
        # A reader through the load balancer (either replica); the client resumes by itself
        # when the replica it reads from goes away.
        with Client(lb.url) as client:
            for event in client.streams.resume(stream_id, after=last):
                followed.append(event)
                if len(followed) == 3:
                    leaving.process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert leaving.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert [e.seq for e in followed] == list(range(last + 1, last + 1 + len(followed)))
    assert isinstance(followed[-1], StreamCompleted)
    events = journal_of(survivor, stream_id)
    print("takeover after SIGTERM:", assert_taken_over(events, reference, before))
    log = leaving.log()
    assert "handed 1 stream(s) over" in log, log


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_an_upstream_stream_is_continued_with_an_assistant_prefill(
    redis: RedisServer, kind: str, tmp_path: Path
) -> None:
    """Gateways in front of an upstream (here a tokenwire serving the embedded model, which
    continues a final assistant turn on /v1/messages as Anthropic does, and on
    /v1/chat/completions with vLLM's ``continue_final_message``): the replica that takes the
    stream over sends the partial answer as a prefill."""
    with tokenwire_server("--threads", "1") as upstream:
        protocol = "anthropic" if kind == "anthropic" else "openai"
        with Client(upstream.url, protocol=protocol) as direct:
            answer = direct.chat.create(messages=STORY, **GREEDY).text
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[upstreams.up]\nurl = "{upstream.url}/v1"\nkind = "{kind}"\n'
            + ('prefill = "continue_final_message"\n' if kind == "openai" else "")
        )
        gateway = [*replica_args(redis), "--no-embedded", "--config", str(config)]
        with tokenwire_server(*gateway) as survivor:
            with tokenwire_server(*gateway) as doomed:
                stream_id, last, before = start_on(doomed, cut_after=1500)
                with Client(survivor.url) as client:
                    for count, _ in enumerate(client.streams.resume(stream_id, after=last)):
                        if count == 2:
                            os.kill(doomed.process.pid, signal.SIGKILL)
                doomed.process.wait(timeout=10)
            events = journal_of(survivor, stream_id)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == StreamCompleted.type
    stages = [e.get("stage") for e in events if e["type"] == Progress.type]
    assert stages.count("takeover") == 1
    seam = next(i for i, e in enumerate(events) if e.get("stage") == "takeover")
    streamed = "".join(e["text"] for e in events[:seam] if e["type"] == TextDelta.type)
    text = "".join(e["text"] for e in events if e["type"] == TextDelta.type)
    assert streamed.startswith(before) and answer.startswith(streamed)
    assert text.startswith(streamed) and len(text) > len(streamed)
    # max_tokens counts from the takeover upstream: the answer goes on at least as far.
    print(f"{kind} upstream takeover:", "identical" if text.startswith(answer) else text)
