"""Fault injection against real ``tokenwire serve`` processes, a real Redis and a scripted
upstream that crashes on cue (tests/fault_upstream.py).

The same three promises are checked after every fault:
- every stream ends with exactly one terminal event (seqs 0..n contiguous, terminal last);
- nothing already journaled is lost (a resume replays what clients saw, byte for byte);
- the server's memory returns to its baseline (RSS after repeated rounds, with slack).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import psutil
import pytest

from tests.fault_upstream import RunningFault, fault_upstream
from tokenwire.events import TERMINAL_TYPES

from ..conftest import RunningServer, tokenwire_server
from .services import redis_process

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fault() -> Iterator[RunningFault]:
    with fault_upstream() as running:
        yield running


def chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def data_lines(text: str) -> list[str]:
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


def native_events(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data_lines(text)]


def assert_one_terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events, "no events"
    assert [e["seq"] for e in events] == list(range(len(events))), "a gap or a duplicate"
    terminals = [e for e in events if e["type"] in TERMINAL_TYPES]
    assert terminals == [events[-1]], f"terminals: {terminals}"
    return terminals[0]


def replay(url: str, stream_id: str, after: int = -1) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/v1/streams/{stream_id}?after={after}", timeout=60)
    assert response.status_code == 200, response.text
    return native_events(response.text)


def rss(server: RunningServer) -> int:
    return int(psutil.Process(server.process.pid).memory_info().rss)


def wait_idle(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/healthz", timeout=10).json()["active_streams"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("streams still active")


# -- upstream crash -------------------------------------------------------------------------------


def test_upstream_crash_mid_stream_ends_each_stream_once_and_keeps_the_partial(
    fault: RunningFault,
) -> None:
    with tokenwire_server(
        "--upstream", f"fault={fault.url}", "--no-embedded", "--disconnect-grace", "30"
    ) as server:  # fmt: skip

        def one(index: int) -> tuple[str, str]:
            model, words = ("crash", f"after={3 + index % 5} gap=0.01") if index % 3 else (
                "ok", "n=8 gap=0.01")  # fmt: skip
            with httpx.stream(
                "POST", f"{server.url}/v1/streams", json=chat(model, words), timeout=60
            ) as response:
                assert response.status_code == 200
                return response.headers["x-stream-id"], response.read().decode()

        threads: list[tuple[str, str]] = []
        lock = threading.Lock()

        def run(index: int) -> None:
            result = one(index)
            with lock:
                threads.append(result)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(24)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert len(threads) == 24
        failed = 0
        for stream_id, body in threads:
            events = native_events(body)
            terminal = assert_one_terminal(events)
            if terminal["type"] == "stream.failed":
                failed += 1
                assert terminal["error"]["type"].startswith("backend")
                assert any(e["type"] == "text.delta" for e in events)  # the partial is there
            else:
                assert terminal["type"] == "stream.completed"
            assert replay(server.url, stream_id) == events  # nothing journaled was lost
        assert failed == 16


# -- a replica killed mid-stream -------------------------------------------------------------------


class Follower(threading.Thread):
    """Reads a native stream, remembering every SSE message as it arrives."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[dict[str, Any]] = []
        self.stream_id: str | None = None
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as response:
                self.stream_id = response.headers["x-stream-id"]
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(orjson.loads(line[5:]))
                        self.started.set()
        except BaseException as exc:  # the test inspects it
            self.error = exc
        finally:
            self.started.set()


@pytest.mark.timeout(180)
def test_replica_killed_mid_stream_is_finished_by_another_with_nothing_lost(
    fault: RunningFault,
) -> None:
    with redis_process(durable=True) as redis:
        common = ("--upstream", f"fault={fault.url}", "--no-embedded", "--journal", redis.url,
                  "--disconnect-grace", "30")  # fmt: skip
        with tokenwire_server(*common) as b, tokenwire_server(*common) as a:
            follower = Follower(f"{a.url}/v1/streams", chat("trickle", "n=400 gap=0.02"))
            follower.start()
            assert follower.started.wait(30)
            time.sleep(0.6)
            a.process.kill()  # SIGKILL: no drain, no flush, no goodbye
            a.process.wait(10)
            follower.join(30)
            seen = follower.events
            assert follower.stream_id is not None and len(seen) > 5
            # The client resumes on B from what it has; B waits out A's liveness lease.
            rest = replay(b.url, follower.stream_id, after=seen[-1]["seq"])
            events = seen + rest
            terminal = assert_one_terminal(events)
            assert terminal["type"] == "stream.failed"
            assert terminal["error"]["code"] == "producer_lost"
            # Everything A had journaled is there, in order, and a fresh replay agrees.
            assert replay(b.url, follower.stream_id) == events


# -- a client that never reads ---------------------------------------------------------------------


def raw_request(
    port: int, method: str, path: str, body: bytes = b"", rcvbuf: int = 0
) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def relay_latencies(url: str, n: int = 150, gap: float = 0.01) -> list[float]:
    """Upstream send -> client arrival, per token, for a ``fast`` stream (same clock)."""
    latencies = []
    body = chat("fast", f"n={n} gap={gap}")
    with httpx.stream("POST", f"{url}/v1/streams", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"text.delta"' in line:
                arrived = time.monotonic_ns()
                sent = int(orjson.loads(line[5:])["text"].split("@")[1])
                latencies.append((arrived - sent) / 1e9)
    assert len(latencies) == n
    return latencies


SEND_TIMEOUT = 10.0


@pytest.mark.timeout(240)
def test_a_client_that_never_reads_blocks_nothing_and_holds_bounded_memory(
    fault: RunningFault,
) -> None:
    with tokenwire_server(
        "--upstream", f"fault={fault.url}", "--no-embedded",
        "--send-timeout", str(SEND_TIMEOUT), "--disconnect-grace", "60", "--heartbeat", "1",
    ) as server:  # fmt: skip
        relay_latencies(server.url, 50)  # warm up
        baseline = statistics.median(relay_latencies(server.url))

        # 1. A big stream (~6 MB of events, more than the kernel buffers on both sides) to a
        #    socket that never reads, with a 4 KiB receive buffer: the producer is not held.
        big = orjson.dumps(chat("fast", "n=100000 gap=0"))
        stuck = raw_request(server.port, "POST", "/v1/streams", big, rcvbuf=4096)
        try:
            deadline = time.monotonic() + 60
            runs: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                runs = [r for r in fault.stats() if "n=100000" in str(r)]
                if runs and runs[-1].get("outcome") == "completed":
                    break
                time.sleep(0.2)
            assert runs and runs[-1]["outcome"] == "completed"
            assert runs[-1]["sent"] == 100000
        finally:
            stuck.close()

        # 2. The same 6 MB, finished, replayed to 20 readers that never read: memory must
        #    not grow by 20 copies (each holds at most its socket buffers).
        with httpx.stream("POST", f"{server.url}/v1/streams", content=big, timeout=60) as read:
            stream_id = read.headers["x-stream-id"]
            size = sum(len(chunk) for chunk in read.iter_bytes())
        assert size > 5 * 2**20
        wait_idle(server.url)
        before = rss(server)
        stuck_readers = [
            raw_request(server.port, "GET", f"/v1/streams/{stream_id}", rcvbuf=4096)
            for _ in range(20)
        ]
        stuck_at = time.monotonic()
        try:
            time.sleep(1.0)
            peak = rss(server)
            # 3. Meanwhile other streams keep their pace (a ratio with slack, never an
            #    absolute speed).
            during = statistics.median(relay_latencies(server.url))
            assert time.monotonic() - stuck_at < SEND_TIMEOUT, "measured after the drop"
            # 4. Past the send timeout the server drops them: reading one now drains what
            #    the kernels buffered, then hits the end, far short of the stream.
            time.sleep(max(0.0, stuck_at + SEND_TIMEOUT + 2 - time.monotonic()))
            sock = stuck_readers[0]
            sock.settimeout(10)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    got += len(chunk)
            assert got < size / 2, (got, size)
        finally:
            for sock in stuck_readers:
                sock.close()
        print(f"relay p50 {baseline * 1e3:.2f} ms -> {during * 1e3:.2f} ms with 20 stuck readers;"
              f" RSS {before / 2**20:.1f} -> {peak / 2**20:.1f} MiB")  # fmt: skip
        assert during <= max(5 * baseline, baseline + 0.05), (baseline, during)
        assert peak - before < 40 * 2**20, (before, peak)
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        events = replay(server.url, stream_id)
        assert_one_terminal(events)
        assert events[-1]["type"] == "stream.completed"
        assert sum(e["type"] == "text.delta" for e in events) == 100000


# -- thousands of abrupt disconnects, and the leak check -------------------------------------------


async def _abrupt(port: int, body: bytes, rng: random.Random, ids: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    # SO_LINGER 0: close() sends RST, the most abrupt way a client can vanish.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.write(
        b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        when = rng.random()
        if when < 0.3:
            await asyncio.sleep(rng.random() * 0.01)  # before or while the stream starts
        else:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"x-stream-id:"):
                    ids.append(line.split(b":", 1)[1].strip().decode())
            if when > 0.6:
                await asyncio.wait_for(reader.read(rng.randint(1, 4000)), 30)
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


async def _storm(port: int, count: int, concurrency: int, seed: int) -> list[str]:
    return await _storm_body(port, orjson.dumps(chat("ok", "n=40 gap=0.005")), count,
                             concurrency, seed)  # fmt: skip


async def _storm_body(port: int, body: bytes, count: int, concurrency: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    ids: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await _abrupt(port, body, rng, ids)

    await asyncio.gather(*(one() for _ in range(count)))
    return ids


def _full_streams(url: str, count: int) -> None:
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            response = client.post(f"{url}/v1/streams", json=chat("ok", "n=20 gap=0"))
            assert native_events(response.text)[-1]["type"] == "stream.completed"


@pytest.mark.timeout(300)
def test_thousands_of_abrupt_disconnects_end_every_stream_exactly_once(
    fault: RunningFault,
) -> None:
    with tokenwire_server(
        "--upstream", f"fault={fault.url}", "--no-embedded",
        "--disconnect-grace", "0", "--heartbeat", "1",
    ) as server:  # fmt: skip
        started = time.monotonic()
        ids = asyncio.run(_storm(server.port, 2000, 100, seed=9))
        storm_s = time.monotonic() - started
        wait_idle(server.url)
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert len(ids) > 1000 and len(set(ids)) == len(ids)
        # Every stream whose id reached a client ended exactly once, with nothing lost.
        outcomes: dict[str, int] = {}
        with httpx.Client(timeout=60) as client:
            for stream_id in ids:
                response = client.get(f"{server.url}/v1/streams/{stream_id}")
                assert response.status_code == 200
                terminal = assert_one_terminal(native_events(response.text))
                outcomes[terminal["type"]] = outcomes.get(terminal["type"], 0) + 1
        print(f"2000 abrupt disconnects in {storm_s:.1f}s; {len(ids)} streams: {outcomes}")
        assert set(outcomes) <= {"stream.cancelled", "stream.completed"}
        assert outcomes.get("stream.cancelled", 0) > 0  # disconnects did cut streams


@pytest.mark.timeout(400)
def test_memory_returns_to_baseline_after_many_streams_and_disconnects(
    fault: RunningFault,
) -> None:
    with tokenwire_server(
        "--upstream", f"fault={fault.url}", "--no-embedded",
        "--disconnect-grace", "0", "--heartbeat", "1",
        # Finished streams leave the journal after 1 s, so retention is not mistaken for a leak.
        "--stream-ttl", "1",
    ) as server:  # fmt: skip
        # Warm-up round: allocator arenas, caches and lazy imports settle.
        asyncio.run(_storm(server.port, 500, 100, seed=1))
        _full_streams(server.url, 200)
        wait_idle(server.url)
        time.sleep(1.5)
        _full_streams(server.url, 5)  # a create sweeps the expired streams
        baseline = rss(server)
        for round_ in range(3):
            asyncio.run(_storm(server.port, 500, 100, seed=10 + round_))
            _full_streams(server.url, 200)
            wait_idle(server.url)
            time.sleep(1.5)
            _full_streams(server.url, 5)
        after = rss(server)
        journal = [
            line for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines()
            if line.startswith("tokenwire_journal")
        ]  # fmt: skip
        print(f"RSS baseline {baseline / 2**20:.1f} MiB, after 3 more rounds of 500 abrupt "
              f"disconnects + 200 streams: {after / 2**20:.1f} MiB; {journal}")  # fmt: skip
        assert after - baseline < max(16 * 2**20, baseline * 0.1), (baseline, after)


@pytest.mark.timeout(400)
def test_embedded_model_memory_and_slots_return_after_disconnect_storms() -> None:
    """The same leak check on the embedded model (llama.cpp decode slots, fair queue)."""
    with tokenwire_server(
        "--disconnect-grace", "0", "--heartbeat", "1", "--stream-ttl", "1",
        "--max-tokens-limit", "16",
    ) as server:  # fmt: skip
        body = orjson.dumps(chat("default", "Tell me about the sea."))

        def round_(seed: int) -> None:
            ids = asyncio.run(_storm_body(server.port, body, 60, 30, seed))
            assert ids  # some streams started before their clients vanished
            with httpx.Client(timeout=60) as client:
                for _ in range(10):
                    response = client.post(f"{server.url}/v1/streams", content=body)
                    terminal = assert_one_terminal(native_events(response.text))
                    assert terminal["type"] == "stream.completed"
            wait_idle(server.url, 60)  # every decode slot came back
            time.sleep(1.5)

        round_(1)  # warm-up
        baseline = rss(server)
        for seed in (2, 3):
            round_(seed)
        after = rss(server)
        print(f"embedded: RSS {baseline / 2**20:.1f} -> {after / 2**20:.1f} MiB over 2 rounds")
        assert after - baseline < max(16 * 2**20, baseline * 0.1), (baseline, after)
