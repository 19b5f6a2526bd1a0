"""Redis outages lose nothing: real ``tokenwire serve`` replicas, a real redis-server that is
SIGKILLed mid-answer and started again on the same port (empty, or with its AOF data) or a
master that Redis Sentinel fails over, and a scripted upstream trickling a known text.

What a user sees is checked on the very connection that was streaming when Redis died (no
resume): the whole answer, in order, once, then the protocol's terminal frame; a reader on
another replica sees the same; a later replay from Redis is identical. An outage longer than
``--journal-outage`` ends the stream with a typed failure instead of a hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.fault_upstream import RunningFault, fault_upstream

from ..conftest import tokenwire_server
from .services import redis_process, redis_sentinel

pytestmark = pytest.mark.e2e

TOKENS = 150
TEXT = "".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(TOKENS))


@pytest.fixture(scope="module")
def fault() -> Iterator[RunningFault]:
    with fault_upstream() as running:
        yield running


def body(n: int = TOKENS, gap: float = 0.02, **extra: Any) -> dict[str, Any]:
    return {
        "model": "trickle",
        "messages": [{"role": "user", "content": f"n={n} gap={gap}"}],
        **extra,
    }


class Reader(threading.Thread):
    """One SSE connection, read to its end; keeps every ``data:`` payload and whether the
    body ended cleanly (a cut chunked body raises in httpx)."""

    def __init__(self, method: str, url: str, json: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.method, self.url, self.json = method, url, json
        self.data: list[str] = []
        self.stream_id: str | None = None
        self.error: BaseException | None = None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream(self.method, self.url, json=self.json, timeout=90) as response:
                assert response.status_code == 200, response.read()
                self.stream_id = response.headers["x-stream-id"]
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.data.append(line[5:].strip())
                        self.first.set()
        except BaseException as exc:  # the test inspects it
            self.error = exc
        finally:
            self.first.set()

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(d) for d in self.data]


def openai_text(reader: Reader) -> tuple[str, list[str | None]]:
    assert reader.data and reader.data[-1] == "[DONE]", reader.data[-3:]
    chunks = [orjson.loads(d) for d in reader.data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    return text, [r for r in reasons if r]


def native_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text.delta")


def assert_contiguous_one_terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert [e["seq"] for e in events] == list(range(len(events))), "a gap or a duplicate"
    terminals = [e for e in events if e["type"].startswith("stream.") and e["type"] not in (
        "stream.started",)]  # fmt: skip
    assert terminals == [events[-1]], terminals
    return events[-1]


def replay(url: str, stream_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/v1/streams/{stream_id}?after=-1", timeout=60)
    assert response.status_code == 200, response.text
    return [
        orjson.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("durable", [False, True], ids=["restarted-empty", "restarted-with-aof"])
def test_redis_killed_and_restarted_mid_answer_loses_nothing(
    fault: RunningFault, durable: bool
) -> None:
    """The measured failure: a Redis SIGKILL + restart mid-answer cut the client's SSE after
    15 chunks with no terminal event. Now every connection gets the whole answer."""
    with redis_process(durable=durable) as redis:
        common = ("--upstream", f"fault={fault.url}", "--no-embedded", "--journal", redis.url,
                  "--disconnect-grace", "30", "--heartbeat", "1")  # fmt: skip
        with tokenwire_server(*common) as a, tokenwire_server(*common) as b:
            openai = Reader("POST", f"{a.url}/v1/chat/completions", body(stream=True))
            native = Reader("POST", f"{a.url}/v1/streams", body())
            openai.start()
            native.start()
            assert openai.first.wait(30) and native.first.wait(30)
            assert native.stream_id is not None
            other = Reader("GET", f"{b.url}/v1/streams/{native.stream_id}")  # another replica
            other.start()
            time.sleep(0.6)
            redis.kill()
            time.sleep(0.5)
            redis.start()
            for reader in (openai, native, other):
                reader.join(90)
                assert not reader.is_alive(), "a reader hangs"
                assert reader.error is None, repr(reader.error)
            # The very connection that streamed through the outage has everything, once.
            text, reasons = openai_text(openai)
            assert text == TEXT
            assert reasons == ["stop"]
            events = native.events()
            assert assert_contiguous_one_terminal(events)["type"] == "stream.completed"
            assert native_text(events) == TEXT
            assert other.events() == events
            # And Redis holds it all again, on either replica.
            assert replay(b.url, native.stream_id) == events
            assert replay(a.url, native.stream_id) == events


@pytest.mark.timeout(180)
def test_an_outage_beyond_the_bound_fails_typed_and_keeps_the_partial(fault: RunningFault) -> None:
    with redis_process() as redis:
        common = ("--upstream", f"fault={fault.url}", "--no-embedded", "--journal", redis.url,
                  "--journal-outage", "2", "--disconnect-grace", "30")  # fmt: skip
        with tokenwire_server(*common) as a, tokenwire_server(*common) as b:
            native = Reader("POST", f"{a.url}/v1/streams", body(n=400, gap=0.02))
            native.start()
            assert native.first.wait(30) and native.stream_id is not None
            other = Reader("GET", f"{b.url}/v1/streams/{native.stream_id}")
            other.start()
            time.sleep(0.6)
            redis.kill()
            for reader in (native, other):
                reader.join(30)  # the bound is 2 s: neither may wait for Redis to return
                assert not reader.is_alive(), "a reader hangs while Redis is down"
                assert reader.error is None, repr(reader.error)
                events = reader.events()
                terminal = assert_contiguous_one_terminal(events)
                assert terminal["type"] == "stream.failed", terminal
                assert terminal["error"]["code"] == "journal_unavailable"
                assert native_text(events) and TEXT.startswith(native_text(events)[:26])
            redis.start()
            # Redis is back (empty): the producer stores the partial output and the failure.
            deadline = time.monotonic() + 30
            while True:
                try:
                    stored = replay(b.url, native.stream_id)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "the partial output was not stored"
                    time.sleep(0.5)
            terminal = assert_contiguous_one_terminal(stored)
            assert terminal["type"] == "stream.failed", (terminal, len(stored))
            assert terminal["error"]["code"] == "journal_unavailable"
            seen = native.events()[:-1]
            assert stored[: len(seen)] == seen  # what the client saw is what Redis keeps


@pytest.mark.timeout(180)
def test_a_sentinel_failover_mid_answer_loses_and_duplicates_nothing(fault: RunningFault) -> None:
    """The master is SIGKILLed mid-answer; redis-sentinel promotes the replica (which may
    lack the last writes: asynchronous replication). Producers append what it lacks."""
    with redis_sentinel() as sentinel:
        common = ("--upstream", f"fault={fault.url}", "--no-embedded", "--journal", sentinel.url,
                  "--disconnect-grace", "30", "--heartbeat", "1")  # fmt: skip
        with tokenwire_server(*common) as a, tokenwire_server(*common) as b:
            readers = [
                Reader("POST", f"{a.url}/v1/chat/completions", body(n=250, stream=True)),
                Reader("POST", f"{a.url}/v1/streams", body(n=250)),
                Reader("POST", f"{b.url}/v1/streams", body(n=250)),
            ]
            for reader in readers:
                reader.start()
            assert all(reader.first.wait(30) for reader in readers)
            followers = [
                Reader("GET", f"{other.url}/v1/streams/{reader.stream_id}")
                for reader, other in zip(readers[1:], (b, a), strict=True)
            ]
            for follower in followers:
                follower.start()
            time.sleep(0.8)
            old = sentinel.master_port()
            sentinel.master.kill()
            assert sentinel.wait_for_failover(away_from=old) == sentinel.replica.port
            for reader in readers + followers:
                reader.join(90)
                assert not reader.is_alive(), "a reader hangs"
                assert reader.error is None, repr(reader.error)
            expected = "".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(250))
            text, reasons = openai_text(readers[0])
            assert (text, reasons) == (expected, ["stop"])
            for reader, follower, other in zip(readers[1:], followers, (b, a), strict=True):
                events = reader.events()
                assert assert_contiguous_one_terminal(events)["type"] == "stream.completed"
                assert native_text(events) == expected
                assert follower.events() == events
                assert reader.stream_id is not None
                assert replay(other.url, reader.stream_id) == events
