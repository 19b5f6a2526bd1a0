"""Resume latency and per-event journal cost: the in-memory journal vs Redis, in one run.

1. Per-event append cost, in process, on a real redis-server started for the run:
   - ``burst``: events appended back to back (a fast model, a coalesced flush), wall and
     producer CPU per event, Redis calls per event (``INFO commandstats``) and Redis CPU;
   - ``paced``: one event every ``--pace-ms`` (a token stream as the model makes it), the
     producer's CPU per event, which is what a token costs the serving process;
   - ``unbatched``: Redis with a round trip awaited per event: what group commit saves.
2. Resume latency over HTTP: two real ``tokenwire serve`` processes (embedded model), one
   per journal; a finished stream is resumed with ``Last-Event-ID`` on a fresh connection,
   alternating between the two servers; latency = request sent -> first replayed event.

    python benchmarks/resume_latency.py [--quick]

Writes benchmarks/results/resume_latency[_quick].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from _common import free_port, write_results
from tokenwire.events import StreamCompleted, StreamStarted, TextDelta
from tokenwire.journal import MemoryJournal, StreamMeta
from tokenwire.journal.base import Journal
from tokenwire.journal.redis import RedisJournal

PROMPT = [{"role": "user", "content": "Count from 1 to 5000, separated by commas."}]


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/install-system-deps.sh)")
    directory = tempfile.mkdtemp(prefix="tw-bench-redis-")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def redis_info(url: str) -> dict[str, float]:
    port = url.rsplit(":", 1)[1].split("/")[0]
    cli = shutil.which("redis-cli") or "redis-cli"
    out = subprocess.run(
        [cli, "-p", port, "INFO", "all"], capture_output=True, text=True, check=True
    ).stdout
    info: dict[str, float] = {"calls": 0.0, "requests": 0.0, "cpu": 0.0}
    for line in out.splitlines():
        if line.startswith(("used_cpu_user:", "used_cpu_sys:")):
            info["cpu"] += float(line.split(":")[1])
        elif line.startswith("cmdstat_"):
            # Commands run inside Lua count here too; "requests" are what a client sends
            # (everything but the in-script commands the append script runs).
            calls = float(line.split("calls=")[1].split(",")[0])
            info["calls"] += calls
            # Commands the append script runs inside Redis are not requests.
            inside = ("xadd", "hexists", "hset", "hmget", "xrevrange")
            if not line.startswith(tuple(f"cmdstat_{name}:" for name in inside)):
                info["requests"] += calls
    return info


# -- 1. per-event append cost ---------------------------------------------------------------


async def append_run(journal: Journal, events: int, mode: str, pace_ms: float) -> dict[str, Any]:
    meta = StreamMeta(
        id=f"bench-{mode}-{time.monotonic_ns()}", model="m", protocol="native", created=0
    )
    await journal.control.produce(meta.id)
    await journal.create(meta)
    await journal.append(meta.id, StreamStarted(id=meta.id, model="m", created=0))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    sleep_total = 0.0
    for i in range(events):
        seq = await journal.append(meta.id, TextDelta(text=f" {i},"))
        if mode == "unbatched" and isinstance(journal, RedisJournal):
            # One awaited round trip per token: what a naive journal would pay.
            await journal._stored(journal._producing[meta.id], seq)
        elif mode == "paced":
            t = time.perf_counter()
            await asyncio.sleep(pace_ms / 1000)
            sleep_total += time.perf_counter() - t
        else:
            await asyncio.sleep(0)  # tokens arrive between other work on the loop
    await journal.append(meta.id, StreamCompleted())
    wall = time.perf_counter() - wall0 - sleep_total
    cpu = time.process_time() - cpu0
    return {
        "events": events,
        "wall_us_per_event": wall / events * 1e6,
        "cpu_us_per_event": cpu / events * 1e6,
    }


async def append_costs(url: str, events: int, pace_events: int, pace_ms: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    memory = MemoryJournal()
    out["memory"] = {
        "burst": await append_run(memory, events, "burst", pace_ms),
        "paced": await append_run(memory, pace_events, "paced", pace_ms),
    }
    redis = RedisJournal(url)
    await redis.start()
    try:
        results: dict[str, Any] = {}
        for mode, n in (("burst", events), ("paced", pace_events), ("unbatched", events // 4)):
            before = redis_info(url)
            result = await append_run(redis, n, mode, pace_ms)
            after = redis_info(url)
            # The heartbeat's own calls are a rounding error over these runs.
            result["redis_commands_per_event"] = (after["calls"] - before["calls"]) / n
            result["redis_requests_per_event"] = (after["requests"] - before["requests"]) / n
            result["redis_cpu_us_per_event"] = (after["cpu"] - before["cpu"]) / n * 1e6
            results[mode] = result
        out["redis"] = results
    finally:
        await redis.close()
    out["floor"] = {"paced": await bare_command_floor(url, pace_events, pace_ms)}
    return out


async def bare_command_floor(url: str, events: int, pace_ms: float) -> dict[str, Any]:
    """One bare redis-py SET per paced event: the least any Redis write per token costs
    (a loop woken every few ms pays far more per command than a hot one)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.ping()
    wall = cpu = 0.0
    try:
        for i in range(events):
            w, c = time.perf_counter(), time.process_time()
            await client.set("tw-bench-floor", i)
            wall += time.perf_counter() - w
            await asyncio.sleep(pace_ms / 1000)
            cpu += time.process_time() - c
    finally:
        await client.aclose()
    return {
        "events": events,
        "wall_us_per_event": wall / events * 1e6,
        "cpu_us_per_event": cpu / events * 1e6,
    }


# -- 2. resume latency over HTTP ----------------------------------------------------------


@contextmanager
def tokenwire(journal: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire.cli.main", "serve", "--port", str(port),
         "--journal", journal, "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"tokenwire ({journal}) did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def finished_stream(url: str, max_tokens: int) -> tuple[str, int]:
    body = {"model": "default", "messages": PROMPT, "max_tokens": max_tokens,
            "temperature": 0.9, "seed": 5}  # fmt: skip
    last = -1
    with httpx.stream("POST", f"{url}/v1/streams", json=body, timeout=300) as response:
        stream_id = response.headers["x-stream-id"]
        for line in response.iter_lines():
            if line.startswith("id: "):
                last = int(line[4:])
    return stream_id, last


def resume_once(url: str, stream_id: str, after: int) -> float:
    """Fresh connection, Last-Event-ID: seconds until the first replayed event arrives."""
    with httpx.Client(timeout=30) as client:
        started = time.perf_counter()
        with client.stream(
            "GET", f"{url}/v1/streams/{stream_id}", headers={"last-event-id": str(after)}
        ) as response:
            for line in response.iter_lines():
                if line.startswith("id: "):
                    return time.perf_counter() - started
    raise RuntimeError("no event replayed")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def resume_latency(redis_url: str, rounds: int, max_tokens: int) -> dict[str, Any]:
    with tokenwire("memory") as memory_url, tokenwire(redis_url) as redis_url_http:
        servers = {"memory": memory_url, "redis": redis_url_http}
        streams = {name: finished_stream(url, max_tokens) for name, url in servers.items()}
        samples: dict[str, list[float]] = {name: [] for name in servers}
        for name, url in servers.items():  # warm-up
            resume_once(url, streams[name][0], streams[name][1] // 2)
        for _ in range(rounds):
            for name, url in servers.items():  # interleaved: noise hits both alike
                stream_id, last = streams[name]
                samples[name].append(resume_once(url, stream_id, last // 2) * 1000)
    return {
        name: {
            "rounds": rounds,
            "events_in_stream": streams[name][1] + 1,
            "p50_ms": statistics.median(values),
            "p90_ms": percentile(values, 0.9),
            "p99_ms": percentile(values, 0.99),
            "mean_ms": statistics.fmean(values),
        }
        for name, values in samples.items()
    }


# -- report -------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    costs, latency = result["append_cost"], result["resume_latency"]

    def extra(mode: str) -> float:
        return float(
            costs["redis"][mode]["cpu_us_per_event"] - costs["memory"][mode]["cpu_us_per_event"]
        )

    lines = [
        "# Resume latency and journal cost: memory vs Redis",
        "",
        f"Run {result['when']} ({'quick' if result['quick'] else 'full'}), "
        f"loopback Redis {result['redis_version']}, 2-core shared machine.",
        "",
        "## Per-event append cost",
        "",
        "| journal | mode | wall µs/event | producer CPU µs/event "
        "| Redis requests/event | Redis CPU µs/event |",
        "|---|---|---|---|---|---|",
    ]
    for journal, modes in costs.items():
        for mode, r in modes.items():
            calls = r.get("redis_requests_per_event")
            cpu = r.get("redis_cpu_us_per_event")
            lines.append(
                f"| {journal} | {mode} | {r['wall_us_per_event']:.1f} | "
                f"{r['cpu_us_per_event']:.1f} | {'' if calls is None else f'{calls:.3f}'} | "
                f"{'' if cpu is None else f'{cpu:.1f}'} |"
            )
    lines += [
        "",
        f"burst: back to back; paced: one event per {result['pace_ms']} ms (wall excludes the "
        "pacing sleeps); unbatched: Redis with one awaited round trip per event. Requests "
        "are client commands (EVALSHA, heartbeat); the append script's XADDs run inside Redis.",
        "",
        "Redis over memory, producer CPU per event: burst "
        f"**{extra('burst'):+.1f} µs**, paced **{extra('paced'):+.1f} µs**. The floor row "
        "is one bare redis-py SET per paced event (plus the same sleep): what any Redis write "
        "per token costs on this machine.",
        "",
        "## Resume latency (fresh connection, Last-Event-ID -> first replayed event)",
        "",
        "| journal | p50 ms | p90 ms | p99 ms | rounds |",
        "|---|---|---|---|---|",
    ]
    for journal, r in latency.items():
        lines.append(
            f"| {journal} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['rounds']} |"
        )
    ratio = latency["redis"]["p50_ms"] / latency["memory"]["p50_ms"]
    lines += ["", f"Redis / memory resume p50: **{ratio:.2f}x**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, < 60 s")
    parser.add_argument("--events", type=int, help="events per burst append run")
    parser.add_argument("--rounds", type=int, help="resumes per journal")
    parser.add_argument("--pace-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    events = args.events or (3000 if args.quick else 30000)
    rounds = args.rounds or (30 if args.quick else 200)
    pace_events = 300 if args.quick else 2000
    with redis_server() as url:
        costs = asyncio.run(append_costs(url, events, pace_events, args.pace_ms))
        latency = resume_latency(url, rounds, max_tokens=60 if args.quick else 200)
        port = url.rsplit(":", 1)[1].split("/")[0]
        version = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "-p", port, "INFO", "server"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
    redis_version = next(
        (
            line.split(":")[1].strip()
            for line in version.splitlines()
            if line.startswith("redis_version")
        ),
        "?",
    )
    result = {
        "benchmark": "resume_latency",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "redis_version": redis_version,
        "pace_ms": args.pace_ms,
        "append_cost": costs,
        "resume_latency": latency,
    }
    stem = "resume_latency_quick" if args.quick else "resume_latency"
    write_results(stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
