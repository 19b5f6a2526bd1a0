"""Capacity: many idle SSE streams with heartbeats, and many active relayed streams.

Two measurements against one real ``tokenwire`` server process (``create_app`` under
uvicorn with uvloop and httptools, the production stack), each with its own client process
holding the connections on raw asyncio sockets (one ``asyncio.Protocol`` per connection,
no task per connection):

- **idle**: N streams whose backend never emits (``SilentBackend``), heartbeats every
  ``--heartbeat`` s. Reported: server RSS per stream (RSS with N open minus RSS before, / N),
  heartbeat lag (gap between two pings on one stream minus the heartbeat interval) p50/p99/max,
  and the server's event-loop stall (a 10 ms sleeper's overshoot) p99/max.
  Targets: 10,000 streams, <= 20 KB RSS each, heartbeat lag p99 <= 250 ms.
- **active**: M streams whose backend emits a token every ``1/--rate`` s each (the relay
  path: backend -> journal -> renderer -> SSE; the embedded model is not involved, so the
  numbers are the server's own). Reported: delivered events/s and the loop stall p99/max.
  Target: 1,000 streams, no stall over 50 ms.

The server process is this file with ``--serve`` (it raises its own file-descriptor limit);
``/bench/stats`` reports its RSS, task count and loop stalls.

``--breakdown [N]`` says where an idle stream's memory goes instead: the server under
tracemalloc, snapshots at N and 2N idle streams, the difference per stream by component and
by line, with gc object counts (``results/idle_capacity_breakdown.md``).

    python benchmarks/idle_capacity.py [--quick] [--streams N] [--active M] [--hold S]
    python benchmarks/idle_capacity.py --breakdown [N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from _common import free_port, headline, percentile, process, wait_healthy, write_results


def raise_fd_limit() -> int:
    """As many file descriptors as allowed: 65,536 where we may raise the hard limit (root;
    a gateway stream holds two sockets), else the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for wanted in (max(hard, 65536), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- server side -----------------------------------------------------------------------------


class LoopMonitor:
    """Overshoot of a 10 ms sleep: how long the event loop was unable to run a ready task."""

    def __init__(self) -> None:
        self.stalls: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            self.stalls.append(time.perf_counter() - started - 0.01)

    def snapshot(self) -> dict[str, float]:
        stalls = self.stalls or [0.0]
        return {
            "samples": len(stalls),
            "stall_p50_ms": percentile(stalls, 50) * 1000,
            "stall_p99_ms": percentile(stalls, 99) * 1000,
            "stall_max_ms": (max(stalls) if stalls else float("nan")) * 1000,
        }


def dump_snapshot(path: str) -> None:
    """tracemalloc's snapshot to ``path``, object counts by type to ``path.types.json``."""
    import tracemalloc

    gc.collect()
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    Path(path + ".types.json").write_text(json.dumps(counts))
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(path)


def make_backend(mode: str, rate: float) -> Any:
    from tokenwire.backends.base import Backend, ModelInfo
    from tokenwire.cancel import CancelToken
    from tokenwire.events import Event, Progress, TextDelta
    from tokenwire.requests import ChatRequest

    class SilentBackend(Backend):
        """Accepts, then never emits: the stream stays open on heartbeats alone."""

        name = "silent"

        def models(self) -> list[ModelInfo]:
            return [ModelInfo("silent")]

        async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
            yield Progress(stage="waiting")
            await cancel.wait()

    class TickingBackend(Backend):
        """A token every 1/rate seconds until cancelled (the relay path, no model)."""

        name = "ticking"

        def models(self) -> list[ModelInfo]:
            return [ModelInfo("ticking")]

        async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
            yield Progress(stage="prefill")
            gap = 1.0 / rate
            while not cancel.is_cancelled():
                await asyncio.sleep(gap)
                yield TextDelta(text=" tok")

    return SilentBackend() if mode == "idle" else TickingBackend()


def serve(port: int, mode: str, heartbeat: float, rate: float, upstream: int = 0) -> None:
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from tokenwire.config import Settings
    from tokenwire.server.app import create_app
    from tokenwire.server.http import HttpProtocol

    raise_fd_limit()
    if os.environ.get("CAPACITY_TRACEMALLOC"):  # --breakdown: frames kept per allocation
        import tracemalloc

        tracemalloc.start(int(os.environ["CAPACITY_TRACEMALLOC"]))
    if os.environ.get("CAPACITY_GC_THRESHOLD"):  # experiments: "700,10,10"
        gc.set_threshold(*(int(x) for x in os.environ["CAPACITY_GC_THRESHOLD"].split(",")))
    if os.environ.get("CAPACITY_GC_LOG"):
        gc_started = [0.0]

        def gc_log(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_started[0] = time.perf_counter()
            elif (took := time.perf_counter() - gc_started[0]) > 0.02:
                print(f"gc gen{info['generation']} {took * 1000:.0f} ms", file=sys.stderr)

        gc.callbacks.append(gc_log)
    settings = Settings(
        port=port,
        heartbeat=heartbeat,
        disconnect_grace=0,
        max_finished_streams=100,
        stream_ttl=5,
        log_level="warning",
    )
    if mode == "gateway":
        # Every stream is relayed from the slow upstream, over a connection of its own.
        settings.no_embedded = True
        settings.extra = {
            "upstreams": {
                "slow": {
                    "url": f"http://127.0.0.1:{upstream}/v1",
                    "discover_models": False,
                    "max_connections": 100_000,
                    "first_token_timeout": 3600.0,
                    "idle_timeout": 3600.0,
                }
            }
        }
        app = create_app(settings)
    else:
        app = create_app(settings, backend=make_backend(mode, rate))
    monitor = LoopMonitor()

    async def stats(request: Request) -> JSONResponse:
        if request.query_params.get("collect"):
            gc.collect()
        if path := request.query_params.get("snapshot"):
            dump_snapshot(path)
        if request.query_params.get("reset"):
            monitor.stalls = []
            if monitor.task is None:
                monitor.task = asyncio.ensure_future(monitor.run())
        return JSONResponse(
            {
                "rss_kb": rss_kb(),
                "tasks": len(asyncio.all_tasks()),
                "active": app.state.server.manager.active_streams,
                **monitor.snapshot(),
            }
        )

    app.add_route("/bench/stats", stats, methods=["GET"])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=HttpProtocol,  # as `tokenwire serve`: uvicorn's httptools protocol, lean
        backlog=8192,
        log_level="warning",
        timeout_keep_alive=60,
    )


# -- the slow upstream (gateway mode) --------------------------------------------------------


class SlowUpstream(asyncio.Protocol):
    """One connection of an OpenAI-compatible upstream that answers each streamed request
    with its headers, a role chunk and (``first_token``) one token, then nothing: a model
    server that is slow to go on. No task per connection, so 10,000 cost it little."""

    def __init__(self, first_token: bool) -> None:
        self.first_token = first_token
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").lower()
        length = 0
        for line in head.split("\r\n"):
            if line.startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = b""
        if head.startswith("get") and "/models" in head:
            body = b'{"object":"list","data":[{"id":"slow","object":"model"}]}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            return
        out = [
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n",
            self.chunk({"role": "assistant", "content": ""}),
        ]
        if self.first_token:
            out.append(self.chunk({"content": "Hello"}))
        self.transport.write(b"".join(out))

    @staticmethod
    def chunk(delta: dict[str, str]) -> bytes:
        payload = json.dumps(
            {
                "id": "chatcmpl-slow",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "slow",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
        ).encode()
        message = b"data: " + payload + b"\n\n"
        return b"%x\r\n%b\r\n" % (len(message), message)


def serve_upstream(port: int, first_token: bool) -> None:
    import uvloop

    raise_fd_limit()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SlowUpstream(first_token), "127.0.0.1", port, backlog=8192
        )
        async with server:
            await server.serve_forever()

    uvloop.run(run())


# -- client side -----------------------------------------------------------------------------


class StreamClient(asyncio.Protocol):
    """One SSE connection: counts pings (with their gaps) and data events."""

    def __init__(self, owner: Holder, request: bytes) -> None:
        self.owner = owner
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.last_ping: float | None = None
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.ready.done():
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.ready.set_result(self.head.startswith(b"HTTP/1.1 200"))
            data = self.head
            self.head = b""
        owner = self.owner
        owner.bytes += len(data)
        pings = data.count(b": ping")
        if pings:
            if self.last_ping is not None and owner.measuring:
                owner.lags.append(now - self.last_ping - owner.heartbeat)
            self.last_ping = now
            owner.pings += pings
        owner.events += data.count(b"\nid: ") + data.startswith(b"id: ")

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost += 1
        if not self.ready.done():
            self.ready.set_result(False)


class Holder:
    def __init__(self, port: int, heartbeat: float) -> None:
        self.port = port
        self.heartbeat = heartbeat
        self.lags: list[float] = []
        self.pings = 0
        self.events = 0
        self.bytes = 0
        self.lost = 0
        self.measuring = False
        self.clients: list[StreamClient] = []
        body = json.dumps(
            {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        self.request = (
            b"POST /v1/streams HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    async def open(self, count: int, concurrency: int = 256) -> int:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        failures = 0

        async def one() -> None:
            nonlocal failures
            async with gate:
                for attempt in range(5):
                    try:
                        _, client = await loop.create_connection(
                            lambda: StreamClient(self, self.request), "127.0.0.1", self.port
                        )
                        ok = await asyncio.wait_for(client.ready, 60)
                    except (OSError, TimeoutError):
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    if ok:
                        self.clients.append(client)
                        return
                failures += 1

        await asyncio.gather(*(one() for _ in range(count)))
        return failures

    def close(self) -> None:
        for client in self.clients:
            if client.transport is not None:
                client.transport.close()


async def client_run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    raise_fd_limit()
    base = f"http://127.0.0.1:{args.port}"
    async with httpx.AsyncClient(timeout=30) as http:

        async def stats(reset: bool = False, collect: bool = False) -> dict[str, Any]:
            params = {"reset": "1"} if reset else {}
            if collect:
                params["collect"] = "1"
            response = await http.get(f"{base}/bench/stats", params=params)
            data: dict[str, Any] = response.json()
            return data

        before = await stats(reset=True, collect=True)
        holder = Holder(args.port, args.heartbeat)
        started = time.perf_counter()
        failures = await holder.open(args.count)
        opened_s = time.perf_counter() - started
        await asyncio.sleep(min(3.0, args.heartbeat * 2))
        await stats(reset=True)  # loop stalls from here on: the steady state
        holder.measuring = True
        events_before, hold_started = holder.events, time.perf_counter()
        await asyncio.sleep(args.hold)
        holder.measuring = False
        held_s = time.perf_counter() - hold_started
        during = await stats()
        open_streams = len(holder.clients) - holder.lost
        result = {
            "mode": args.mode,
            "streams": args.count,
            "open": open_streams,
            "failed_to_open": failures,
            "open_seconds": round(opened_s, 2),
            "server_rss_before_mb": round(before["rss_kb"] / 1024, 1),
            "server_rss_open_mb": round(during["rss_kb"] / 1024, 1),
            "rss_per_stream_kb": round(
                (during["rss_kb"] - before["rss_kb"]) / max(1, args.count), 2
            ),
            "server_tasks": during["tasks"],
            "server_active_streams": during["active"],
            "loop_stall_p99_ms": round(during["stall_p99_ms"], 2),
            "loop_stall_max_ms": round(during["stall_max_ms"], 2),
            "client_rss_mb": round(rss_kb() / 1024, 1),
        }
        if args.mode in ("idle", "gateway"):
            lags = holder.lags
            result |= {
                "heartbeat_s": args.heartbeat,
                "pings_measured": len(lags),
                "heartbeat_lag_p50_ms": round(percentile(lags, 50) * 1000, 2),
                "heartbeat_lag_p99_ms": round(percentile(lags, 99) * 1000, 2),
                "heartbeat_lag_max_ms": round(max(lags) * 1000, 2) if lags else None,
            }
        else:
            result |= {
                "rate_per_stream": args.rate,
                "events_per_second": round((holder.events - events_before) / held_s, 1),
                "expected_events_per_second": args.rate * args.count,
            }
        holder.close()
        await asyncio.sleep(0.5)
        return result


@contextlib.contextmanager
def server_process(
    mode: str,
    heartbeat: float,
    rate: float,
    env: dict[str, str] | None = None,
    first_token: bool = True,
) -> Iterator[int]:
    """This file with ``--serve`` on a free port; yields the port once /healthz answers.
    In ``gateway`` mode the slow upstream runs first, in a process of its own."""
    port = free_port()
    common = ["--mode", mode, "--heartbeat", str(heartbeat), "--rate", str(rate)]
    here = str(Path(__file__).resolve())
    with contextlib.ExitStack() as stack:
        if mode == "gateway":
            upstream = free_port()
            args = [sys.executable, here, "--serve-upstream", "--port", str(upstream)]
            if not first_token:
                args.append("--before-first-token")
            stack.enter_context(process(args))
            common += ["--upstream", str(upstream)]
            deadline = time.monotonic() + 30
            while not _listening(upstream):
                if time.monotonic() > deadline:
                    raise TimeoutError("the slow upstream did not listen")
                time.sleep(0.1)
        serve_cmd = [sys.executable, here, "--serve", "--port", str(port), *common]
        server = stack.enter_context(process(serve_cmd, env))
        wait_healthy(f"http://127.0.0.1:{port}/healthz", server, 60)
        yield port


def _listening(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def run_side(
    mode: str, count: int, hold: float, heartbeat: float, rate: float, first_token: bool = True
) -> dict[str, Any]:
    here = Path(__file__).resolve()
    common = ["--mode", mode, "--heartbeat", str(heartbeat), "--rate", str(rate)]
    with server_process(mode, heartbeat, rate, first_token=first_token) as port:
        client = subprocess.run(
            [
                sys.executable,
                str(here),
                "--client",
                "--port",
                str(port),
                "--count",
                str(count),
                "--hold",
                str(hold),
                *common,
            ],
            capture_output=True,
            text=True,
            timeout=hold + 600,
        )
        if client.returncode != 0:
            raise RuntimeError(f"client failed: {client.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
        return result


# -- where an idle stream's memory goes (--breakdown) ----------------------------------------

#: Components by the innermost frame of an allocation that is not the standard library.
_COMPONENTS = (
    ("/tokenwire/backends/_transport.py", "gateway: upstream connection (_transport.py)"),
    ("/tokenwire/backends/_upstream.py", "gateway: upstream call (_upstream.py)"),
    ("/tokenwire/backends/openai.py", "gateway: upstream call (_upstream.py)"),
    ("/tokenwire/gateway.py", "gateway: failover and relay (gateway.py)"),
    ("/httpx/", "gateway: httpx request and response objects"),
    ("/httpcore/", "gateway: httpx request and response objects"),
    ("/uvicorn/_compat.py", "event loop: uvloop transport, socket, handles (C)"),
    ("/uvicorn/main.py", "event loop: uvloop transport, socket, handles (C)"),
    ("/uvicorn/middleware/", "ASGI layers held open (middleware, routing, handler)"),
    ("/starlette/", "ASGI layers held open (middleware, routing, handler)"),
    ("/tokenwire/server/auth.py", "ASGI layers held open (middleware, routing, handler)"),
    ("/uvicorn/", "uvicorn connection (protocol, parser, request cycle, scope)"),
    ("/tokenwire/server/http.py", "uvicorn connection (protocol, parser, request cycle, scope)"),
    ("/anyio/", "SSE transport (pump, heartbeats, disconnect watch)"),
    ("/tokenwire/transports/", "SSE transport (pump, heartbeats, disconnect watch)"),
    ("/tokenwire/server/app.py", "route: the stream's frame renderer"),
    ("/tokenwire/journal/", "journal (log, events, reader)"),
    ("/tokenwire/events.py", "journal (log, events, reader)"),
    ("/tokenwire/protocols/", "parsed request (ChatRequest, renderer)"),
    ("/tokenwire/requests.py", "parsed request (ChatRequest, renderer)"),
    ("/pydantic/", "parsed request (ChatRequest, renderer)"),
    ("/tokenwire/", "producer: task, stages, backend, cancel token"),
    ("/benchmarks/", "producer: task, stages, backend, cancel token"),
)


def _component(frames: list[Any]) -> tuple[str, str]:
    """(component, owning line) of one allocation's traceback, innermost frame first."""
    if frames[0].filename.endswith("_weakrefset.py"):
        # asyncio.all_tasks(): one weakref per task, in a set that grows in jumps.
        return "asyncio task registry (weakref per task)", "_weakrefset.py"
    for frame in frames:
        name = frame.filename
        if "site-packages" in name or "/tokenwire/" in name or "/benchmarks/" in name:
            short = name.split("site-packages/")[-1].split("/src/")[-1].split("/benchmarks/")[-1]
            line = f"{short}:{frame.lineno}"
            for marker, component in _COMPONENTS:
                if marker in name:
                    return component, line
            return "other", line
    return "other (no Python frame)", f"{frames[0].filename}:{frames[0].lineno}"


def summarize_snapshots(before: str, after: str, streams: int) -> dict[str, Any]:
    """Bytes per stream by component and by line, and objects per stream by type, between
    two snapshots ``dump_snapshot`` took ``streams`` streams apart."""
    import tracemalloc

    first, second = tracemalloc.Snapshot.load(before), tracemalloc.Snapshot.load(after)
    components: dict[str, float] = {}
    lines: dict[str, list[float]] = {}
    for stat in second.compare_to(first, "traceback"):
        component, line = _component(list(stat.traceback)[::-1])
        components[component] = components.get(component, 0.0) + stat.size_diff
        entry = lines.setdefault(f"{line} ({component.split(' (')[0].split(':')[0]})", [0, 0])
        entry[0] += stat.size_diff
        entry[1] += stat.count_diff
    types_before = json.loads(Path(before + ".types.json").read_text())
    types_after = json.loads(Path(after + ".types.json").read_text())
    types = {k: types_after.get(k, 0) - types_before.get(k, 0) for k in types_after}
    return {
        "streams": streams,
        "traced_bytes_per_stream": round(sum(components.values()) / streams),
        "components": {
            k: round(v / streams)
            for k, v in sorted(components.items(), key=lambda kv: -kv[1])
            if abs(v / streams) >= 8
        },
        "top_lines": {
            k: {"bytes": round(v[0] / streams), "blocks": round(v[1] / streams, 2)}
            for k, v in sorted(lines.items(), key=lambda kv: -kv[1][0])[:30]
        },
        "objects_per_stream": {
            k: round(v / streams, 2)
            for k, v in sorted(types.items(), key=lambda kv: -kv[1])
            if v / streams >= 0.5
        },
    }


async def _breakdown_client(port: int, streams: int, prefix: str) -> dict[str, int]:
    import httpx

    raise_fd_limit()
    base = f"http://127.0.0.1:{port}/bench/stats"
    rss = {}
    holder = Holder(port, 5.0)
    async with httpx.AsyncClient(timeout=600) as http:
        rss["start"] = (await http.get(base, params={"collect": "1"})).json()["rss_kb"]
        # N streams first (everything that is allocated once is then in place), then N more.
        for label in ("a", "b"):
            failures = await holder.open(streams)
            if failures:
                raise RuntimeError(f"{failures} streams failed to open")
            await asyncio.sleep(2)
            stats = await http.get(base, params={"snapshot": f"{prefix}.{label}"})
            rss[label] = stats.json()["rss_kb"]
    holder.close()
    await asyncio.sleep(0.5)
    return rss


def run_breakdown(streams: int, mode: str = "idle", first_token: bool = True) -> dict[str, Any]:
    """Where an idle stream's memory goes: tracemalloc (25 frames) snapshots of the server
    with N and with 2N idle streams, diffed; gc object counts alike."""
    import tempfile

    import uvloop

    env = {"CAPACITY_TRACEMALLOC": "25"}
    with (
        tempfile.TemporaryDirectory() as tmp,
        server_process(mode, 5.0, 5.0, env=env, first_token=first_token) as port,
    ):
        prefix = str(Path(tmp) / "snapshot")
        rss = uvloop.run(_breakdown_client(port, streams, prefix))
        result = summarize_snapshots(prefix + ".a", prefix + ".b", streams)
    # RSS with tracemalloc on also holds its traces: for scale only; idle_capacity.md has
    # the RSS of the production setup.
    result["rss_per_stream_kb_traced"] = round((rss["b"] - rss["a"]) / streams, 2)
    result["mode"] = mode
    result["first_token"] = first_token
    return result


def breakdown_markdown(result: dict[str, Any]) -> str:
    gateway = result.get("mode") == "gateway"
    if gateway:
        what = "one token" if result.get("first_token", True) else "no token"
        title = "# Where a gateway stream's memory goes (waiting on a slow upstream)"
        how = (
            "`python benchmarks/idle_capacity.py --breakdown --gateway`: the capacity server as "
            "a gateway, every stream relayed from a slow upstream over a connection of its own "
            f"(headers, {what}, then silence), with tracemalloc "
        )
    else:
        title = "# Where an idle SSE stream's memory goes"
        how = "`python benchmarks/idle_capacity.py --breakdown`: the capacity server with "
        how += "tracemalloc "
    lines = [
        title,
        "",
        how + f"(25 frames), snapshots at {result['streams']} and {2 * result['streams']} "
        "streams, "
        "diffed and divided by the streams added. An allocation belongs to the innermost frame "
        "outside the standard library. RSS per stream in production: `idle_capacity.md`.",
        "",
        f"Traced Python allocations per stream: **{result['traced_bytes_per_stream']} B**.",
        "",
        "| component | bytes / stream |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in result["components"].items()),
        "",
        "| owning line | bytes / stream | blocks / stream |",
        "|---|---|---|",
        *(f"| `{k}` | {v['bytes']} | {v['blocks']} |" for k, v in result["top_lines"].items()),
        "",
        "| object type (gc-tracked) | per stream |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in result["objects_per_stream"].items()),
        "",
    ]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    idle, active, gateway = results["idle"], results["active"], results.get("gateway")
    lines = [
        "# Capacity: idle SSE streams, gateway streams and active relayed streams",
        "",
        "Server: uvicorn (httptools, with server/http.py's lean containers) + uvloop, one "
        "process. *In-process*: the backend never emits (no upstream). *Gateway*: every "
        "stream is relayed from a slow upstream (another process) over a connection of its "
        "own, which sent its headers and "
        + ("one token" if results.get("first_token", True) else "no token")
        + " and then nothing; the server holds both sockets.",
        "",
        "| measure | in-process | gateway | target |",
        "|---|---|---|---|",
    ]

    def row(label: str, key: str, target: str, fmt: str = "{}") -> None:
        cells = [fmt.format(side[key]) if side and key in side else "—" for side in (idle, gateway)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {target} |")

    capped = gateway.get("capped_by_fd_limit") if gateway else None
    lines.append(
        f"| idle streams held open | {idle['open']} / {idle['streams']} | "
        + (f"{gateway['open']} / {gateway['streams']}" if gateway else "—")
        + (f" (two sockets each: the {capped:,} file descriptors allowed)" if capped else "")
        + " | 10,000 |"
    )
    row("server RSS per stream (lower is better)", "rss_per_stream_kb", "<= 20 KB", "{} KB")
    for side in (idle, gateway):
        if side:
            side["lag"] = (
                f"{side['heartbeat_lag_p50_ms']} / {side['heartbeat_lag_p99_ms']} / "
                f"{side['heartbeat_lag_max_ms']} ms"
            )
            side["stall"] = f"{side['loop_stall_p99_ms']} / {side['loop_stall_max_ms']} ms"
    row(f"heartbeat lag p50 / p99 / max (every {idle['heartbeat_s']} s)", "lag", "p99 <= 250 ms")
    row("loop stall p99 / max", "stall", "")
    for side in (idle, gateway):
        if side:
            side.pop("lag", None)
            side.pop("stall", None)
    lines += [
        "",
        "| active streams | result | target |",
        "|---|---|---|",
        f"| held | {active['open']} / {active['streams']} "
        f"at {active['rate_per_stream']} tokens/s each | 1,000 |",
        f"| events delivered / s | {active['events_per_second']} "
        f"(offered {active['expected_events_per_second']}) | |",
        f"| loop stall p99 / max | {active['loop_stall_p99_ms']} / "
        f"{active['loop_stall_max_ms']} ms | max <= 50 ms |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 idle / 200 active, short")
    parser.add_argument("--smoke", action="store_true", help="CI: 300 idle / 50 active, 2 s")
    parser.add_argument("--streams", type=int, default=10_000, help="idle streams")
    parser.add_argument("--active", type=int, default=1_000, help="active streams")
    parser.add_argument("--rate", type=float, default=5.0, help="tokens/s per active stream")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds to measure")
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument(
        "--gateway-streams",
        type=int,
        default=None,
        help="gateway streams (default: --streams; 0: skip the gateway measurement)",
    )
    parser.add_argument(
        "--gateway",
        action="store_true",
        help="with --breakdown: the gateway path (streams relayed from a slow upstream)",
    )
    parser.add_argument(
        "--before-first-token",
        action="store_true",
        help="the slow upstream sends no token at all (the gateway waits for the first)",
    )
    parser.add_argument(
        "--breakdown",
        type=int,
        nargs="?",
        const=1000,
        default=0,
        metavar="N",
        help="where an idle stream's memory goes (tracemalloc, N and 2N streams)",
    )
    # internal roles
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="idle", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    first_token = not args.before_first_token
    if args.serve_upstream:
        serve_upstream(args.port, first_token)
        return {}
    if args.serve:
        serve(args.port, args.mode, args.heartbeat, args.rate, args.upstream)
        return {}
    if args.client:
        import uvloop

        print(json.dumps(uvloop.run(client_run(args))), flush=True)
        return {}
    if args.breakdown:
        mode = "gateway" if args.gateway else "idle"
        breakdown = run_breakdown(args.breakdown, mode, first_token)
        stem = "idle_capacity_breakdown" + ("_gateway" if args.gateway else "")
        if args.gateway and not first_token:
            stem += "_before_first_token"
        write_results(stem, breakdown, breakdown_markdown(breakdown))
        return breakdown
    if args.quick:
        args.streams, args.active, args.hold = min(args.streams, 2000), min(args.active, 200), 8
        args.heartbeat = min(args.heartbeat, 2.0)
    if args.smoke:
        args.streams, args.active, args.hold, args.heartbeat = 300, 50, 3, 1.0
    gateway_streams = args.streams if args.gateway_streams is None else args.gateway_streams
    # A gateway stream holds two sockets in the server: the file-descriptor limit caps them.
    fd_limit = raise_fd_limit()
    gateway_cap = (fd_limit - 256) // 2
    capped = gateway_streams > gateway_cap
    gateway_streams = min(gateway_streams, gateway_cap)
    results: dict[str, Any] = {
        "idle": run_side("idle", args.streams, args.hold, args.heartbeat, args.rate),
        "active": run_side("active", args.active, args.hold, args.heartbeat, args.rate),
        "first_token": first_token,
    }
    if gateway_streams:
        results["gateway"] = run_side(
            "gateway", gateway_streams, args.hold, args.heartbeat, args.rate, first_token
        )
        if capped:
            results["gateway"]["capped_by_fd_limit"] = fd_limit
    name = "idle_capacity_smoke" if args.smoke else "idle_capacity_quick" if args.quick else ""
    name = name or "idle_capacity"
    # Against the targets (lower is better; <= 1 meets the target).
    idle, active = results["idle"], results["active"]
    results["target_ratios"] = {
        "rss_per_stream_vs_20kb_ratio": round(idle["rss_per_stream_kb"] / 20, 2),
        "heartbeat_lag_p99_vs_250ms_ratio": round(idle["heartbeat_lag_p99_ms"] / 250, 2),
        "active_stall_max_vs_50ms_ratio": round(active["loop_stall_max_ms"] / 50, 2),
    }
    n = f"{idle['streams']:,}"
    headlines = [
        headline(
            "capacity",
            f"server RSS per idle stream, in-process backend, {n} streams",
            idle["rss_per_stream_kb"],
            unit="KB",
            better="lower",
            goal=20,
        ),
        headline(
            "capacity",
            f"heartbeat lag p99, {n} idle streams",
            idle["heartbeat_lag_p99_ms"],
            unit="ms",
            better="lower",
            goal=250,
        ),
        headline(
            "capacity",
            f"worst event-loop stall, {active['streams']:,} active streams",
            active["loop_stall_max_ms"],
            unit="ms",
            better="lower",
            goal=50,
        ),
    ]
    gateway = results.get("gateway")
    if gateway:
        g = f"{gateway['streams']:,}"
        headlines[1:1] = [
            headline(
                "capacity",
                f"server RSS per gateway stream with its upstream connection, {g} streams",
                gateway["rss_per_stream_kb"],
                unit="KB",
                better="lower",
                goal=20,
            ),
            headline(
                "capacity",
                f"heartbeat lag p99, {g} gateway streams",
                gateway["heartbeat_lag_p99_ms"],
                unit="ms",
                better="lower",
                goal=250,
            ),
        ]
    results["headlines"] = headlines
    write_results(name, results, markdown(results))
    return results


if __name__ == "__main__":
    main()
