"""The Responses API's background mode on two replicas sharing a real Redis, behind nginx.

Created on one replica, polled, resumed after N and cancelled on the other: no gap, no
duplicate, the same text as an uninterrupted seeded run; a cancel stops decoding on the
producing replica and every live or resumed reader, on either replica, gets its terminal
event. Both replicas run the embedded model with ``--threads 1``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from ..conftest import RunningServer, tokenwire_server
from ..sse_reader import parse_frames
from .services import Nginx, RedisServer, nginx, redis_server

pytestmark = [pytest.mark.e2e]

#: Seeded sampling: the same text on every run and every replica.
SEEDED = {
    "input": "Write a long story about a dragon who learns to sing.",
    "temperature": 0.9,
    "extra_body": {"seed": 7},
}
#: With these the embedded model counts on for far longer than any test waits.
COUNT = {"input": "Count from 1 to 5000, separated by commas: 1, 2, 3,", "temperature": 0}


@dataclass
class Cluster:
    redis: RedisServer
    a: RunningServer
    b: RunningServer
    nginx: Nginx


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    args = ["--threads", "1", "--disconnect-grace", "2", "--heartbeat", "1"]
    with (
        redis_server() as redis,
        tokenwire_server("--journal", redis.url, *args) as a,
        tokenwire_server("--journal", redis.url, *args) as b,
        nginx([a.port, b.port]) as proxy,
    ):
        yield Cluster(redis, a, b, proxy)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def raw_events(url: str, response_id: str, after: int | None = None) -> list[dict[str, Any]]:
    query = "stream=true" + (f"&starting_after={after}" if after is not None else "")
    with httpx.stream("GET", f"{url}/v1/responses/{response_id}?{query}", timeout=120) as r:
        assert r.status_code == 200, r.read()
        frames, _ = parse_frames(b"".join(r.iter_bytes()))
    import json

    payloads = [json.loads(f.data) for f in frames]
    assert [f.id for f in frames] == [p["sequence_number"] for p in payloads]
    return payloads


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


@pytest.mark.timeout(300)
def test_background_on_a_resumed_and_polled_on_b_matches_a_seeded_run(cluster: Cluster) -> None:
    reference = client(cluster.a.url).responses.create(
        model="default",
        max_output_tokens=80,
        **SEEDED,  # type: ignore[arg-type]
    )
    started = client(cluster.a.url).responses.create(
        model="default",
        background=True,
        max_output_tokens=80,
        **SEEDED,  # type: ignore[arg-type]
    )
    # Resume on the other replica after N while it generates, then follow live to the end.
    on_b = client(cluster.b.url)
    deadline = time.monotonic() + 60
    while len(on_b.responses.retrieve(started.id).output_text) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    head = raw_events(cluster.b.url, started.id)  # the whole log, from B, to the end
    rest = raw_events(cluster.b.url, started.id, after=9)
    assert [e["sequence_number"] for e in head] == list(range(len(head)))
    assert rest == head[10:]  # no gap, no duplicate
    assert text_of(head) == reference.output_text  # identical to an uninterrupted run
    polled = client(cluster.b.url).responses.retrieve(started.id)
    assert polled.status == "incomplete" and polled.output_text == reference.output_text
    # The SDK's own resume helper, through nginx (either replica).
    with client(cluster.nginx.url).responses.stream(
        response_id=started.id, starting_after=4
    ) as stream:
        events = list(stream)
    assert [e.sequence_number for e in events] == list(range(5, len(head)))


def test_previous_response_id_on_the_other_replica(cluster: Cluster) -> None:
    first = client(cluster.a.url).responses.create(
        model="default", input="My name is Zanzibar. Say OK.", temperature=0, max_output_tokens=10
    )
    second = client(cluster.b.url).responses.create(
        model="default",
        previous_response_id=first.id,
        input="What is my name?",
        temperature=0,
        max_output_tokens=20,
    )
    assert "Zanzibar" in second.output_text
    assert client(cluster.b.url).responses.input_items.list(first.id).data


@pytest.mark.timeout(300)
def test_cancel_on_b_stops_a_and_ends_every_reader(cluster: Cluster) -> None:
    started = client(cluster.a.url).responses.create(
        model="default",
        background=True,
        **COUNT,  # type: ignore[arg-type]
    )
    readers: dict[str, list[dict[str, Any]]] = {}

    def follow(name: str, url: str) -> None:
        readers[name] = raw_events(url, started.id)

    threads = [
        threading.Thread(target=follow, args=(name, url))
        for name, url in (("a", cluster.a.url), ("b", cluster.b.url), ("nginx", cluster.nginx.url))
    ]
    for thread in threads:
        thread.start()
    on_b = client(cluster.b.url)
    deadline = time.monotonic() + 60
    while len(on_b.responses.retrieve(started.id).output_text) < 30:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = on_b.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()  # a terminal event and a closed stream: no hang
    for events in readers.values():
        assert events[-1]["type"] == "response.cancelled"
        assert text_of(events) == cancelled.output_text
    # Decoding stopped on A: nothing is appended after the cancel answered.
    time.sleep(1.0)
    assert client(cluster.a.url).responses.retrieve(started.id).output_text == (
        cancelled.output_text
    )
    assert client(cluster.a.url).responses.cancel(started.id).status == "cancelled"
    resumed = raw_events(cluster.nginx.url, started.id, after=3)
    assert resumed[-1]["type"] == "response.cancelled"
