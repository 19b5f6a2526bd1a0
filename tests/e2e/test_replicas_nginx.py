"""Two tokenwire replicas sharing a real Redis behind a real nginx (round robin, default proxy
buffering on): resume anywhere, Stop from the other replica, producer death, WebSocket.

Every server runs the embedded model with ``--threads 1`` (two decode threads per process
spin against each other on a shared 2-core machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets

from ..conftest import RunningServer, tokenwire_server
from ..sse_reader import TERMINAL, parse_frames, payload_of, read_segment, text_of
from .services import Nginx, RedisServer, nginx, redis_server

pytestmark = [pytest.mark.e2e]

GRACE = 3.0
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to sing."}]
COUNT = [{"role": "user", "content": "Count from 1 to 5000, separated by commas."}]
#: With these the embedded model counts on for well over 1000 tokens (greedy stops at 20).
LONG = {"temperature": 0.9, "seed": 5}
#: A declared tool (not to be called): the stream cannot be continued by another replica.
NO_TAKEOVER = {
    "tools": [{"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}],
    "tool_choice": "none",
}


@dataclass
class Cluster:
    redis: RedisServer
    a: RunningServer
    b: RunningServer
    nginx: Nginx


def replica_args(redis: RedisServer) -> list[str]:
    return [
        "--journal", redis.url,
        "--threads", "1",
        "--disconnect-grace", str(GRACE),
        "--heartbeat", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with (
        redis_server() as redis,
        tokenwire_server(*replica_args(redis)) as a,
        tokenwire_server(*replica_args(redis)) as b,
        nginx([a.port, b.port]) as proxy,
    ):
        yield Cluster(redis, a, b, proxy)


def request_body(protocol: str, seed: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
    body = {
        "model": "default",
        "messages": STORY,
        "max_tokens": max_tokens,
        "temperature": 0.9,
        "seed": seed,
    }
    if protocol == "openai":
        return "/v1/chat/completions", {**body, "stream": True}
    return "/v1/streams", body


def metric(server: RunningServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_drop_and_resume_anywhere_is_byte_identical(cluster: Cluster) -> None:
    """Streams cut at random bytes and resumed through nginx on either replica."""
    rng = random.Random(20261121)
    resumes_before = metric(cluster.a, "tokenwire_resumes_total") + metric(
        cluster.b, "tokenwire_resumes_total"
    )
    cycles = 0
    with httpx.Client(base_url=cluster.nginx.url, timeout=120) as client:
        for protocol, seed in (("native", 11), ("openai", 12), ("native", 13)):
            path, body = request_body(protocol, seed, max_tokens=240)
            reference = read_segment(client, "POST", path, body=body)
            assert reference.finished
            ref_text = "".join(text_of(f) for f in reference.frames)
            assert len(ref_text) > 200
            # Delivered as it is made: nginx's buffering is off for this response.
            assert reference.first_text_at is not None and reference.finished_at is not None
            assert reference.first_text_at < reference.finished_at - 0.3

            segments = [
                read_segment(client, "POST", path, body=body, cut_after=rng.randint(1, 400))
            ]
            stream_id = segments[0].stream_id
            assert stream_id is not None
            while not segments[-1].finished:
                frames = [f for s in segments for f in s.frames]
                last = next((f.id for f in reversed(frames) if f.id is not None), None)
                headers = {"last-event-id": str(last)} if last is not None else {}
                if rng.random() < 0.3:
                    time.sleep(rng.uniform(0.0, 0.3))  # sometimes resume late, from the log
                segments.append(
                    read_segment(
                        client,
                        "GET",
                        f"/v1/streams/{stream_id}",
                        headers=headers,
                        cut_after=rng.randint(1, 1200),
                    )
                )
                assert segments[-1].stream_id == stream_id
                cycles += 1
            frames = [f for s in segments for f in s.frames]
            text = "".join(text_of(f) for f in frames)
            assert text == ref_text, (protocol, seed)
            # No lost and no duplicated event: the same messages with the same ids as the
            # uninterrupted run (OpenAI renders no progress/usage events, and its terminal
            # event as several messages sharing one id); native ids run 0..n once each.
            ids = [f.id for f in frames]
            assert ids == sorted(ids)  # type: ignore[type-var]
            if protocol == "native":
                assert ids == list(range(len(ids)))
            ref_ids = [f.id for f in reference.frames]
            assert ids == ref_ids
            if protocol == "openai":
                chunk_ids = {p["id"] for f in frames if isinstance(p := payload_of(f), dict)}
                assert chunk_ids == {f"chatcmpl-{stream_id}"}
                assert frames[-1].data == "[DONE]"
    assert cycles >= 100, cycles
    # Round robin: both replicas served resumes.
    resumes_a = metric(cluster.a, "tokenwire_resumes_total")
    resumes_b = metric(cluster.b, "tokenwire_resumes_total")
    assert resumes_a > 0 and resumes_b > 0
    assert resumes_a + resumes_b - resumes_before >= cycles


def test_stop_through_the_other_replica_stops_decoding(cluster: Cluster) -> None:
    body = {"model": "default", "messages": COUNT, "max_tokens": 3000, **LONG}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{cluster.a.url}/v1/streams", json=body) as response,
    ):
        stream_id = response.headers["x-stream-id"]
        buffer = b""
        deltas_before = 0
        deltas_after = 0
        cancelled_at: float | None = None
        terminal: dict[str, Any] | None = None
        for chunk in response.iter_raw():
            frames, buffer = parse_frames(buffer + chunk)
            for frame in frames:
                payload = payload_of(frame)
                if payload["type"] == "text.delta":
                    if cancelled_at is None:
                        deltas_before += 1
                    else:
                        deltas_after += 1
                if payload["type"] in TERMINAL:
                    terminal = payload
            if terminal is not None:
                break
            if cancelled_at is None and deltas_before >= 10:
                stop = client.post(f"{cluster.b.url}/v1/streams/{stream_id}/cancel")
                assert stop.status_code == 200, stop.text
                assert stop.json()["cancelled"] is True
                cancelled_at = time.monotonic()
    assert terminal is not None and terminal["type"] == "stream.cancelled"
    assert terminal["reason"] == "stop"
    assert deltas_after <= 5, deltas_after
    # Idempotent, from either replica, once the stream is over.
    for server in (cluster.a, cluster.b):
        again = httpx.post(f"{server.url}/v1/streams/{stream_id}/cancel", timeout=10)
        assert again.status_code == 200


def test_stop_of_a_resumed_stream_through_nginx(cluster: Cluster) -> None:
    """Resume on one replica, Stop through the proxy (either replica), reader sees it."""
    body = {"model": "default", "messages": COUNT, "max_tokens": 3000, **LONG}
    with httpx.Client(base_url=cluster.nginx.url, timeout=60) as client:
        first = read_segment(client, "POST", "/v1/streams", body=body, cut_after=600)
        stream_id = first.stream_id
        last = max(f.id for f in first.frames if f.id is not None)
        with client.stream(
            "GET", f"/v1/streams/{stream_id}", headers={"last-event-id": str(last)}
        ) as response:
            buffer = b""
            terminal = None
            seqs = []
            stopped = False
            for chunk in response.iter_raw():
                frames, buffer = parse_frames(buffer + chunk)
                for frame in frames:
                    payload = payload_of(frame)
                    seqs.append(payload["seq"])
                    if payload["type"] in TERMINAL:
                        terminal = payload
                if terminal is not None:
                    break
                if not stopped and len(seqs) >= 5:
                    assert client.post(f"/v1/streams/{stream_id}/cancel").status_code == 200
                    stopped = True
    assert seqs == list(range(last + 1, last + 1 + len(seqs)))
    assert terminal is not None and terminal["type"] == "stream.cancelled"


def test_generation_outlives_the_producer_grace_while_another_replica_reads(
    cluster: Cluster,
) -> None:
    """Dropped from A, resumed on B: A's disconnect timer sees B's reader and keeps going."""
    body = {"model": "default", "messages": COUNT, "max_tokens": 260, **LONG}
    with httpx.Client(timeout=120) as client:
        first = read_segment(
            client, "POST", f"{cluster.a.url}/v1/streams", body=body, cut_after=300
        )
        stream_id = first.stream_id
        last = max(f.id for f in first.frames if f.id is not None)
        with client.stream(
            "GET", f"{cluster.b.url}/v1/streams/{stream_id}", headers={"last-event-id": str(last)}
        ) as response:
            chunks = response.iter_raw()
            next(chunks)
            time.sleep(GRACE + 3.0)  # connected but idle, well past A's grace
            buffer = b""
            payloads = []
            for chunk in chunks:
                frames, buffer = parse_frames(buffer + chunk)
                payloads += [payload_of(f) for f in frames]
                if payloads and payloads[-1]["type"] in TERMINAL:
                    break
    assert payloads[-1]["type"] == "stream.completed", payloads[-1]


def test_abandoned_stream_is_cancelled_after_the_grace(cluster: Cluster) -> None:
    body = {"model": "default", "messages": COUNT, "max_tokens": 3000, **LONG}
    with httpx.Client(base_url=cluster.nginx.url, timeout=60) as client:
        first = read_segment(client, "POST", "/v1/streams", body=body, cut_after=400)
        stream_id = first.stream_id
        last = max(f.id for f in first.frames if f.id is not None)
        # Within the grace generation goes on without any reader.
        time.sleep(GRACE / 2)
        mid = read_segment(
            client,
            "GET",
            f"/v1/streams/{stream_id}",
            headers={"last-event-id": str(last)},
            cut_after=3000,
        )
        # Not cancelled by the drop: the resume continues the same, still running stream.
        assert not mid.finished
        assert [f.id for f in mid.frames][:1] == [last + 1]
    dropped_at = time.monotonic()
    # Watch Redis, not the stream: a resume would be a reader and rightly keep it going.
    # The end may come a little after the grace (a reader's presence lease is 3 s).
    while cluster.redis.cli("HEXISTS", f"tw:{{{stream_id}}}:meta", "done") != "1":
        assert time.monotonic() - dropped_at < 60, "the abandoned stream never ended"
        time.sleep(0.2)
    assert time.monotonic() - dropped_at >= GRACE - 0.5
    with httpx.Client(base_url=cluster.nginx.url, timeout=60) as client:
        rest = read_segment(client, "GET", f"/v1/streams/{stream_id}?after={last}")
    assert rest.finished
    terminal = payload_of(rest.frames[-1])
    assert terminal["type"] == "stream.cancelled" and terminal["reason"] == "disconnect"
    # It stopped long before max_tokens: the grace, not the length, ended it.
    assert terminal["seq"] < 2000


def test_websocket_start_cancel_resume_across_replicas(cluster: Cluster) -> None:
    url = cluster.nginx.url.replace("http://", "ws://") + "/v1/ws"
    body = {"model": "default", "messages": COUNT, "max_tokens": 3000, **LONG}

    async def scenario() -> None:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "request": body, "ref": "r"}))
            seen = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for _ in range(8)]
        stream_id = seen[0]["stream_id"]
        assert seen[0]["ref"] == "r" and [m["seq"] for m in seen] == list(range(8))
        # Two fresh sockets through nginx: one resumes, the other stops the stream.
        async with websockets.connect(url) as reader, websockets.connect(url) as stopper:
            await reader.send(json.dumps({"type": "resume", "stream_id": stream_id, "after": 7}))
            rest = [json.loads(await asyncio.wait_for(reader.recv(), 60)) for _ in range(3)]
            await stopper.send(json.dumps({"type": "cancel", "stream_id": stream_id}))
            ack = json.loads(await asyncio.wait_for(stopper.recv(), 30))
            assert ack == {"type": "cancel.accepted", "stream_id": stream_id}
            while rest[-1]["type"] not in TERMINAL:
                rest.append(json.loads(await asyncio.wait_for(reader.recv(), 30)))
        assert [m["seq"] for m in rest] == list(range(8, 8 + len(rest)))
        assert rest[-1]["type"] == "stream.cancelled" and rest[-1]["reason"] == "stop"

    asyncio.run(scenario())


def test_evicted_and_unknown_streams_through_nginx(cluster: Cluster) -> None:
    missing = httpx.get(f"{cluster.nginx.url}/v1/streams/nope-nope", timeout=10)
    assert missing.status_code == 404
    assert "No stream" in missing.json()["error"]["message"]
    bad = httpx.get(
        f"{cluster.nginx.url}/v1/streams/nope", headers={"last-event-id": "x"}, timeout=10
    )
    assert bad.status_code == 400


@pytest.mark.timeout(180)
def test_killing_the_producer_ends_readers_with_a_failure(cluster: Cluster) -> None:
    # Declared tools make a stream one that no replica continues (takeover.py): its readers
    # get producer_lost. (tests/e2e/test_takeover.py: streams that are continued.)
    body = {"model": "default", "messages": COUNT, "max_tokens": 3000, **LONG, **NO_TAKEOVER}
    with tokenwire_server(*replica_args(cluster.redis)) as doomed:
        with httpx.Client(timeout=60) as client:
            first = read_segment(
                client, "POST", f"{doomed.url}/v1/streams", body=body, cut_after=500
            )
        stream_id = first.stream_id
        last = max(f.id for f in first.frames if f.id is not None)

        def kill_soon() -> None:
            os.kill(doomed.process.pid, signal.SIGKILL)

        with (
            httpx.Client(timeout=60) as client,
            client.stream(
                "GET",
                f"{cluster.a.url}/v1/streams/{stream_id}",
                headers={"last-event-id": str(last)},
            ) as response,
        ):
            buffer = b""
            payloads: list[dict[str, Any]] = []
            killed_at: float | None = None
            for chunk in response.iter_raw():
                frames, buffer = parse_frames(buffer + chunk)
                payloads += [payload_of(f) for f in frames]
                if killed_at is None and len(payloads) >= 3:
                    kill_soon()
                    killed_at = time.monotonic()
                if payloads and payloads[-1]["type"] in TERMINAL:
                    break
        assert killed_at is not None
        waited = time.monotonic() - killed_at
        doomed.process.wait(timeout=10)
    terminal = payloads[-1]
    assert terminal["type"] == "stream.failed"
    assert terminal["error"]["code"] == "producer_lost"
    assert waited < 15, waited
    seqs = [p["seq"] for p in payloads]
    assert seqs == list(range(last + 1, last + 1 + len(seqs)))
    # Anyone resuming later, through either replica, gets the same end.
    with httpx.Client(base_url=cluster.nginx.url, timeout=30) as client:
        for _ in range(2):
            again = read_segment(client, "GET", f"/v1/streams/{stream_id}?after={last}")
            assert [payload_of(f) for f in again.frames] == payloads
