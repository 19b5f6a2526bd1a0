"""Choosing the ASGI server, event loop and JSON library by measurement.

Servers: the same tokenwire app (``create_app`` with a backend that emits tokens as fast as
it can, so the server's own cost is what is measured) under
- uvicorn + uvloop + httptools (tokenwire's default),
- uvicorn + asyncio + h11 (pure Python),
- granian (Rust HTTP, ASGI interface),
in one run, alternating rounds. Each round streams ``--streams`` concurrent SSE streams of
``--tokens`` tokens each; reported: events/s delivered and server CPU µs per event
(user + system time of the server's processes).

JSON: encoding one OpenAI chunk (the hot path: one per token) with orjson, msgspec and the
standard library, in-process, best of several repeats.

    python benchmarks/asgi_json.py [--quick] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _common import free_port, write_results

HERE = Path(__file__).resolve().parent
TOKENS_ENV = "ASGI_BENCH_TOKENS"


def granian_app() -> Any:
    """App factory for granian (``--factory asgi_json:granian_app``)."""
    return make_app(int(os.environ.get(TOKENS_ENV, "2000")))


def make_app(tokens: int) -> Any:
    from tokenwire.backends.base import Backend, ModelInfo
    from tokenwire.cancel import CancelToken
    from tokenwire.config import Settings
    from tokenwire.events import Event, Progress, StreamCompleted, TextDelta, Usage
    from tokenwire.requests import ChatRequest
    from tokenwire.server.app import create_app

    class Firehose(Backend):
        name = "firehose"

        def models(self) -> list[ModelInfo]:
            return [ModelInfo("firehose")]

        async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
            yield Progress(stage="prefill")
            for index in range(tokens):
                if cancel.is_cancelled():
                    return
                if index % 64 == 0:
                    await asyncio.sleep(0)  # let readers run, as a real backend would
                yield TextDelta(text=" word")
            yield Usage(prompt_tokens=1, completion_tokens=tokens)
            yield StreamCompleted()

    settings = Settings(heartbeat=15, disconnect_grace=0, log_level="warning")
    return create_app(settings, backend=Firehose())


def serve_uvicorn(port: int, tokens: int, loop: str, http: str) -> None:
    import uvicorn

    uvicorn.run(
        make_app(tokens), host="127.0.0.1", port=port, loop=loop, http=http, log_level="warning"
    )


SERVERS = {
    "uvicorn+uvloop+httptools": ("uvicorn", "uvloop", "httptools"),
    "uvicorn+asyncio+h11": ("uvicorn", "asyncio", "h11"),
    "granian": ("granian", "", ""),
}


def start_server(name: str, port: int, tokens: int) -> subprocess.Popen[bytes]:
    kind = SERVERS[name][0]
    if kind == "uvicorn":
        args = [sys.executable, str(Path(__file__).resolve()), "--serve", name, "--port", str(port)]
        args += ["--tokens", str(tokens)]
    else:
        granian = str(Path(sys.executable).with_name("granian"))
        args = [granian, "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--workers", "1", "--log-level", "warning", "--working-dir", str(HERE)]
        args += ["--factory", "asgi_json:granian_app"]
    env = {**os.environ, TOKENS_ENV: str(tokens)}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


async def stream_once(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model":"default","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    events = 0
    tail = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data = tail + chunk
        events += data.count(b"\ndata: ") + data.startswith(b"data: ")
        tail = data[-8:]
        if b"data: [DONE]" in data:
            break
    writer.close()
    return events


def round_of(port: int, streams: int) -> tuple[int, float]:
    async def run() -> tuple[int, float]:
        started = time.perf_counter()
        counts = await asyncio.gather(*(stream_once(port) for _ in range(streams)))
        return sum(counts), time.perf_counter() - started

    return asyncio.run(run())


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError("server not ready")


def measure_servers(rounds: int, streams: int, tokens: int) -> dict[str, Any]:
    running: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    results: dict[str, dict[str, list[float]]] = {
        name: {"events_per_s": [], "cpu_us_per_event": []} for name in SERVERS
    }
    errors: dict[str, str] = {}
    try:
        for name in SERVERS:
            port = free_port()
            proc = start_server(name, port, tokens)
            try:
                wait_ready(port, proc)
            except (RuntimeError, TimeoutError) as exc:
                errors[name] = str(exc)
                proc.kill()
                continue
            running[name] = (proc, port)
        for _ in range(rounds):
            for name, (proc, port) in running.items():
                cpu_before = cpu_seconds(proc.pid)
                events, wall = round_of(port, streams)
                cpu = cpu_seconds(proc.pid) - cpu_before
                results[name]["events_per_s"].append(events / wall)
                results[name]["cpu_us_per_event"].append(cpu / max(1, events) * 1e6)
    finally:
        for proc, _ in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    out: dict[str, Any] = {}
    for name, values in results.items():
        if name in errors or not values["events_per_s"]:
            out[name] = {"error": errors.get(name, "no result")}
            continue
        out[name] = {
            "events_per_s": round(statistics.median(values["events_per_s"])),
            "cpu_us_per_event": round(statistics.median(values["cpu_us_per_event"]), 1),
        }
    return out


def measure_json(number: int) -> dict[str, Any]:
    import msgspec
    import orjson

    chunk = {
        "id": "chatcmpl-Qk3v2m9S1aW8n0xYb7ZcRg",
        "object": "chat.completion.chunk",
        "created": 1763700000,
        "model": "default",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "delta": {"content": " streaming"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    encoder = msgspec.json.Encoder()
    candidates = {
        "orjson": lambda: orjson.dumps(chunk),
        "msgspec": lambda: encoder.encode(chunk),
        "json (stdlib)": lambda: json.dumps(chunk, separators=(",", ":")).encode(),
    }
    assert json.loads(orjson.dumps(chunk)) == json.loads(encoder.encode(chunk))
    out = {}
    for name, func in candidates.items():
        best = min(timeit.repeat(func, number=number, repeat=5)) / number
        out[name] = {"ns_per_chunk": round(best * 1e9, 1)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (< 60 s)")
    parser.add_argument("--smoke", action="store_true", help="CI: 1 round, small streams")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _, loop, http = SERVERS[args.serve]
        serve_uvicorn(args.port, args.tokens, loop, http)
        return {}
    if args.quick:
        args.rounds, args.tokens = 3, 2000
    if args.smoke:
        args.rounds, args.tokens, args.streams = 1, 300, 2
    result = {
        "rounds": args.rounds,
        "streams": args.streams,
        "tokens": args.tokens,
        "servers": measure_servers(args.rounds, args.streams, args.tokens),
        "json": measure_json(20_000 if not args.smoke else 2_000),
    }
    base = result["servers"].get("uvicorn+uvloop+httptools", {})
    for row in result["servers"].values():
        if "events_per_s" in row and base.get("events_per_s"):
            row["ratio_vs_default"] = round(row["events_per_s"] / base["events_per_s"], 2)
    lines = [
        "# ASGI server and JSON library",
        "",
        f"{os.cpu_count()} cores; {args.streams} concurrent OpenAI SSE streams of "
        f"{args.tokens} tokens, median of {args.rounds} alternating rounds.",
        "",
        "| server | events/s | server CPU per event | vs default |",
        "|---|---|---|---|",
    ]
    for name, row in result["servers"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | |")
        else:
            lines.append(
                f"| {name} | {row['events_per_s']} | {row['cpu_us_per_event']} µs "
                f"| {row.get('ratio_vs_default', '')}x |"
            )
    lines += ["", "| JSON library | ns per chunk |", "|---|---|"]
    for name, row in result["json"].items():
        lines.append(f"| {name} | {row['ns_per_chunk']} |")
    lines.append("")
    stem = "asgi_json_smoke" if args.smoke else "asgi_json_quick" if args.quick else "asgi_json"
    write_results(stem, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
