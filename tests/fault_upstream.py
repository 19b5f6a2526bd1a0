"""A small fault-injecting OpenAI-compatible upstream (test double for fault injection only).

Raw asyncio HTTP/1.1, so every fault is exact: ``POST /v1/chat/completions`` streams SSE in
chunked encoding, one HTTP chunk per SSE message. The scenario is the request's model name;
``key=value`` words in the last user message tune it (``n=20 gap=0.01 after=3``):

| model       | behaviour |
|-------------|-----------|
| ``ok``        | ``n`` (10) tokens ``tok0 tok1 …``, ``gap`` (0.01 s) apart, usage, [DONE] |
| ``crash``     | ``after`` (3) tokens, then the connection is cut mid-body |
| ``stall``     | ``after`` (3) tokens, then silence (until the client leaves) |
| ``malformed`` | ``after`` (3) tokens, then a chunk that is not JSON |
| ``error500``  | HTTP 500 before any token |
| ``empty``     | 200 and headers, then the connection is cut before any token |
| ``silent``    | 200 and headers, then nothing (a first-token timeout) |
| ``trickle``   | ``n`` tokens of one character each, ``gap`` (0.2 s) apart |
| ``tools``     | one tool call ``get_weather`` streamed in argument pieces |
| ``fast``      | ``n`` tokens ``<i>@<monotonic_ns>@`` sent ``gap`` apart on an absolute schedule |
|               | (gap=0: as fast as the socket takes them) — the relay benchmark's upstream |

``no_stream_options=1`` makes a request carrying ``stream_options`` a 400 (an older server).
``POST /_mode`` with ``{"status": 500}`` makes every chat request answer that status (0: back
to normal). ``GET /_stats`` reports per-request outcomes: ``completed``, ``client_closed``
(the client hung up mid-stream: the upstream stopped generating) or ``crashed``, with the
number of tokens sent — the proof that Stop reaches the upstream.

Run: ``python tests/fault_upstream.py --port P``; tests use ``fault_upstream()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIOS = [
    "ok",
    "crash",
    "stall",
    "malformed",
    "error500",
    "empty",
    "silent",
    "trickle",
    "tools",
    "fast",
]


class FaultUpstream:
    def __init__(self) -> None:
        self.forced_status = 0
        self.requests: list[dict[str, Any]] = []

    # -- HTTP plumbing -----------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, value = line.split(":", 1)
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                keep = await self.route(method, path, body, reader, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def send_json(writer: asyncio.StreamWriter, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def route(
        self,
        method: str,
        path: str,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if method == "GET" and path.endswith("/models"):
            data = [{"id": name, "object": "model", "owned_by": "fault"} for name in SCENARIOS]
            await self.send_json(writer, 200, {"object": "list", "data": data})
            return True
        if method == "GET" and path == "/_stats":
            await self.send_json(writer, 200, {"requests": self.requests})
            return True
        if method == "POST" and path == "/_mode":
            self.forced_status = int(json.loads(body or b"{}").get("status", 0))
            await self.send_json(writer, 200, {"status": self.forced_status})
            return True
        if method == "POST" and path.endswith("/chat/completions"):
            return await self.chat(json.loads(body), reader, writer)
        await self.send_json(writer, 404, {"error": {"message": f"no route {path}"}})
        return True

    # -- chat ----------------------------------------------------------------------------

    async def chat(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        scenario = str(request.get("model", "ok"))
        params: dict[str, float] = {}
        for message in request.get("messages", []):
            if message.get("role") == "user":
                for word in str(message.get("content", "")).split():
                    key, sep, value = word.partition("=")
                    if sep:
                        with contextlib.suppress(ValueError):
                            params[key] = float(value)
        record: dict[str, Any] = {
            "scenario": scenario,
            "outcome": "started",
            "sent": 0,
            "request": request,
            "started": time.time(),
        }
        self.requests.append(record)
        status = self.forced_status or (500 if scenario == "error500" else 200)
        if params.get("no_stream_options") and "stream_options" in request:
            # An older server that refuses fields it does not know.
            record["outcome"] = "status_400"
            message = "Unrecognized request argument supplied: stream_options"
            await self.send_json(writer, 400, {"error": {"message": message}})
            return True
        if status != 200:
            record["outcome"] = f"status_{status}"
            await self.send_json(writer, status, {"error": {"message": f"injected {status}"}})
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        # The client hanging up shows as EOF on the read side.
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            outcome = await self.produce(scenario, params, record, writer, hangup)
        except (ConnectionError, RuntimeError):
            outcome = "client_closed"
        finally:
            hangup.cancel()
            # Let the read finish cancelling before the next request reads the stream.
            with contextlib.suppress(asyncio.CancelledError):
                await hangup
        record["outcome"] = outcome
        record["ended"] = time.time()
        if outcome == "completed":
            writer.write(b"0\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return True
        if outcome == "crashed":
            writer.transport.abort()
        return False

    @staticmethod
    def chunk(data: str) -> bytes:
        payload = f"data: {data}\n\n".encode()
        return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"

    def delta(self, content: str | None = None, **extra: Any) -> bytes:
        delta: dict[str, Any] = {}
        if content is not None:
            delta["content"] = content
        delta.update(extra.pop("delta", {}))
        choice = {"index": 0, "delta": delta, "finish_reason": extra.pop("finish", None)}
        return self.chunk(
            json.dumps(
                {
                    "id": "chatcmpl-fault",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": "fault",
                    "choices": [choice],
                }
            )
        )

    async def produce(
        self,
        scenario: str,
        params: dict[str, float],
        record: dict[str, Any],
        writer: asyncio.StreamWriter,
        hangup: asyncio.Future[bytes],
    ) -> str:
        after = int(params.get("after", 3))

        async def send(data: bytes, gap: float) -> bool:
            """Write; then wait ``gap`` unless the client hangs up first (False)."""
            if hangup.done():
                return False
            writer.write(data)
            await writer.drain()
            if gap > 0:
                await asyncio.wait({hangup}, timeout=gap)
            return not hangup.done()

        if scenario in ("empty",):
            return "crashed"
        if scenario == "silent":
            await hangup
            return "client_closed"
        if not await send(self.delta(delta={"role": "assistant"}, content=""), 0):
            return "client_closed"
        if scenario == "fast":
            return await self.fast(params, record, writer, hangup)
        if scenario == "tools":
            return await self.tools(record, send)
        n = int(params.get("n", 10))
        gap = params.get("gap", 0.2 if scenario == "trickle" else 0.01)
        limit = after if scenario in ("crash", "stall", "malformed") else n
        for i in range(limit):
            text = "abcdefghijklmnopqrstuvwxyz"[i % 26] if scenario == "trickle" else f"tok{i} "
            if not await send(self.delta(text), gap):
                return "client_closed"
            record["sent"] = i + 1
        if scenario == "crash":
            return "crashed"
        if scenario == "stall":
            await hangup
            return "client_closed"
        if scenario == "malformed":
            await send(self.chunk("{this is not json"), 0)
            await hangup
            return "client_closed"
        prompt = int(params.get("prompt", 7))
        tail = self.delta(finish="stop") + self.chunk(
            json.dumps(
                {
                    "id": "chatcmpl-fault",
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": limit},
                }
            )
        )
        if not await send(tail + self.chunk("[DONE]"), 0):
            return "client_closed"
        return "completed"

    async def tools(self, record: dict[str, Any], send: Any) -> str:
        first = {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_fault1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
        pieces = ['{"ci', 'ty": "Par', 'is"}']
        if not await send(self.delta(delta=first), 0.01):
            return "client_closed"
        for piece in pieces:
            call = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            if not await send(self.delta(delta=call), 0.01):
                return "client_closed"
            record["sent"] += 1
        if not await send(self.delta(finish="tool_calls") + self.chunk("[DONE]"), 0):
            return "client_closed"
        return "completed"

    async def fast(
        self,
        params: dict[str, float],
        record: dict[str, Any],
        writer: asyncio.StreamWriter,
        hangup: asyncio.Future[bytes],
    ) -> str:
        n = int(params.get("n", 100))
        gap = params.get("gap", 0.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        prefix = '{"id":"chatcmpl-fast","object":"chat.completion.chunk","created":0,"model":"fast","choices":[{"index":0,"delta":{"content":"'  # noqa: E501
        suffix = '"},"finish_reason":null}]}'
        for i in range(n):
            if hangup.done():
                return "client_closed"
            if gap > 0:
                # An absolute schedule: lateness of one chunk does not shift the others.
                delay = start + (i + 1) * gap - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            writer.write(self.chunk(f"{prefix}{i}@{time.monotonic_ns()}@{suffix}"))
            if gap > 0 or i % 64 == 63:
                await writer.drain()
            record["sent"] = i + 1
        tail = self.delta(finish="stop") + self.chunk(
            json.dumps(
                {
                    "id": "chatcmpl-fast",
                    "choices": [],
                    "usage": {"prompt_tokens": 1, "completion_tokens": n},
                }
            )
        )
        writer.write(tail + self.chunk("[DONE]"))
        await writer.drain()
        return "completed"


async def serve(port: int, host: str = "127.0.0.1") -> None:
    upstream = FaultUpstream()
    server = await asyncio.start_server(upstream.handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.host))
    return 0


# -- test helper ---------------------------------------------------------------------------


@dataclass
class RunningFault:
    url: str  # the /v1 base
    root: str
    process: subprocess.Popen[bytes]

    def stats(self) -> list[dict[str, Any]]:
        import httpx

        requests: list[dict[str, Any]] = httpx.get(f"{self.root}/_stats", timeout=5).json()[
            "requests"
        ]
        return requests

    def set_status(self, status: int) -> None:
        import httpx

        httpx.post(f"{self.root}/_mode", json={"status": status}, timeout=5).raise_for_status()


@contextlib.contextmanager
def fault_upstream(port: int | None = None) -> Iterator[RunningFault]:
    """Run this module as a subprocess on a free port; yields once it answers."""
    import httpx

    if port is None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--port", str(port)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{root}/v1/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield RunningFault(url=f"{root}/v1", root=root, process=process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())
