"""/metrics: Prometheus exposition of TTFT, inter-token latency, tokens, streams, cancels,
resumes, errors and journal size, measured on the real embedded model over real sockets."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.journal import MemoryJournal
from tokenwire.requests import ChatRequest, Message
from tokenwire.router import Router
from tokenwire.server.metrics import Metrics
from tokenwire.streams import StreamManager

from .conftest import tokenwire_server
from .perf_backends import PacedBackend

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def body(content: str, **extra: object) -> dict[str, object]:
    return {
        "model": "default",
        "stream": True,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        **extra,
    }


@pytest.mark.timeout(120)
def test_metrics_follow_real_streams_cancels_resumes_and_errors() -> None:
    with tokenwire_server("--disconnect-grace", "30", "--heartbeat", "1") as server:
        before = scrape(server.url)
        assert value(before, "tokenwire_ttft_seconds_count") == 0
        assert value(before, "tokenwire_streams_active") == 0

        # 1. One complete stream: TTFT once, one inter-token gap per delta after the first.
        deltas = 0
        with httpx.stream(
            "POST",
            f"{server.url}/v1/streams",
            json=body("Count from 1 to 10.", max_tokens=12),
            timeout=60,
        ) as response:
            assert response.status_code == 200
            first_id = response.headers["x-stream-id"]
            for line in response.iter_lines():
                if line == "event: text.delta":
                    deltas += 1
        assert deltas > 1
        after_one = scrape(server.url)
        assert value(after_one, "tokenwire_ttft_seconds_count") == 1
        assert value(after_one, "tokenwire_inter_token_seconds_count") == deltas - 1
        assert value(after_one, "tokenwire_deltas_total") == deltas
        assert 0 < value(after_one, "tokenwire_tokens_out_total") <= 12
        assert value(after_one, "tokenwire_streams_total", outcome="completed") == 1
        assert value(after_one, "tokenwire_journal_streams") == 1
        assert value(after_one, "tokenwire_journal_events") >= deltas + 3

        # 2. A resume of the finished stream counts as one resume.
        replay = httpx.get(f"{server.url}/v1/streams/{first_id}?after=2", timeout=30)
        assert replay.status_code == 200
        # 3. A live stream is "active" while it runs, then Stop counts a cancel.
        with httpx.stream(
            "POST",
            f"{server.url}/v1/streams",
            json=body("Write a long story about a dragon.", max_tokens=400),
            timeout=60,
        ) as response:
            stream_id = response.headers["x-stream-id"]
            lines = response.iter_lines()
            for line in lines:
                if line == "event: text.delta":
                    break
            live = scrape(server.url)
            assert value(live, "tokenwire_streams_active") == 1
            stop = httpx.post(f"{server.url}/v1/streams/{stream_id}/cancel", timeout=10)
            assert stop.status_code == 200
            assert any(line == "event: stream.cancelled" for line in lines)
        # 4. Bad requests count as errors by type.
        bad = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "default"}, timeout=10)
        assert bad.status_code == 400
        missing = httpx.post(
            f"{server.url}/v1/chat/completions", json=body("hi", model="nope"), timeout=10
        )
        assert missing.status_code == 404

        deadline = time.monotonic() + 10
        while True:
            end = scrape(server.url)
            if value(end, "tokenwire_streams_active") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert value(end, "tokenwire_streams_active") == 0
        assert value(end, "tokenwire_resumes_total") == 1
        assert value(end, "tokenwire_cancels_total", reason="stop") == 1
        assert value(end, "tokenwire_streams_total", outcome="cancelled") == 1
        assert value(end, "tokenwire_errors_total", type="invalid_request_error", where="request")
        assert value(end, "tokenwire_errors_total", type="not_found_error", where="request") == 1
        assert value(end, "tokenwire_ttft_seconds_count") == 2
        assert value(end, "tokenwire_journal_streams") == 2


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_inter_token_histogram_measures_the_gaps_the_backend_makes() -> None:
    """A backend that paces deltas 40 ms apart: each observed gap is at least that."""
    metrics = Metrics()
    backend = PacedBackend(pieces=["a", "b", "c", "d", "e"], gap=0.04, first_delay=0.1)
    manager = StreamManager(Router(backend), MemoryJournal(), disconnect_grace=0, observer=metrics)
    request = ChatRequest(model="default", messages=[Message(role="user", content="x")])
    meta = await manager.start(request, protocol="native")
    seen = [event async for event in manager.read(meta.id)]
    assert [e.type for e in seen][-1] == "stream.completed"
    await asyncio.sleep(0)
    ttft = metrics.ttft.collect()[0].samples
    count = {s.name: s.value for s in ttft}
    assert count["tokenwire_ttft_seconds_count"] == 1
    assert count["tokenwire_ttft_seconds_sum"] >= 0.09
    itl = {s.name: s.value for s in metrics.inter_token.collect()[0].samples}
    assert itl["tokenwire_inter_token_seconds_count"] == 4
    assert itl["tokenwire_inter_token_seconds_sum"] >= 4 * 0.035
    # Each gap falls in a bucket above 25 ms: none in the 1, 2.5, 5, 10 ms buckets.
    buckets = {
        s.labels["le"]: s.value
        for s in metrics.inter_token.collect()[0].samples
        if s.name.endswith("_bucket")
    }
    assert buckets["0.025"] == 0
    assert buckets["+Inf"] == 4
    assert metrics.tokens_out._value.get() == 5
    await manager.close()


def test_queued_gauge_reads_the_backends_fair_queue() -> None:
    from tokenwire.admission import FairQueue
    from tokenwire.server.metrics import queued_in

    class QueuedBackend:
        queue = FairQueue(slots=1, max_waiting=5)

    backend = QueuedBackend()
    tickets = [backend.queue.join() for _ in range(3)]  # one admitted, two waiting
    metrics = Metrics()
    metrics.bind(active=lambda: 1, queued=queued_in([backend]), journal_stats=lambda: {})
    assert "tokenwire_streams_queued 2.0" in metrics.render().decode()
    tickets[1].leave()
    assert "tokenwire_streams_queued 1.0" in metrics.render().decode()
    tickets[0].leave()  # the last waiter is admitted
    assert "tokenwire_streams_queued 0.0" in metrics.render().decode()
