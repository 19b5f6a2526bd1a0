"""Server-Sent Events: framing, heartbeats, send timeouts and disconnect detection.

All SSE bytes tokenwire writes are made here. ``EventSourceResponse`` is an ASGI response that
races three things in one task group (as starlette's ``StreamingResponse`` does): sending the
frames, a heartbeat comment whenever the stream has been idle for ``heartbeat`` seconds, and
listening for the client's disconnect. Whichever ends first ends the others, and the frame
iterator is always closed, so its ``finally`` blocks (the reader count) run at once.

Why not sse-starlette: it detects server shutdown by patching uvicorn at import time, which we
avoid (STYLE.md); what remains is ~100 lines we would otherwise wrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import orjson
from starlette.types import Receive, Scope, Send

__all__ = ["STREAM_HEADERS", "EventSourceResponse", "encode", "encode_comment"]

#: Headers every streaming response carries: no caching, no proxy buffering, no compression.
STREAM_HEADERS = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
    "connection": "keep-alive",
}


def encode(
    payload: Mapping[str, Any] | str | bytes,
    *,
    id: int | None = None,
    event: str | None = None,
    retry_ms: int | None = None,
) -> bytes:
    """One SSE message. Dicts become compact JSON; strings (``[DONE]``) and bytes (JSON a
    renderer encoded itself, one line) are sent as is."""
    if isinstance(payload, bytes):
        data = payload
    elif isinstance(payload, str):
        data = payload.encode()
    else:
        data = orjson.dumps(payload)
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if id is not None:
        head += b"id: " + str(id).encode() + b"\n"
    if retry_ms is not None:
        head += b"retry: " + str(retry_ms).encode() + b"\n"
    # orjson never emits raw newlines, so one data line always suffices.
    return head + b"data: " + data + b"\n\n"


def encode_comment(text: str = "") -> bytes:
    # One comment line, no blank line after it: the official openai/anthropic clients keep
    # the last event id across events (as the spec says) and turn a blank line after it
    # into an empty-data event, which they then fail to parse as JSON.
    return b": " + text.encode() + b"\n"


class EventSourceResponse:
    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        heartbeat: float = 15.0,
        send_timeout: float | None = 30.0,
        headers: Mapping[str, str] | None = None,
        status_code: int = 200,
    ) -> None:
        self.frames = frames
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.status_code = status_code
        self.headers = {**STREAM_HEADERS, **(headers or {})}
        self._last_send = 0.0
        #: When the send in progress started (None: none in progress); the heartbeat task
        #: enforces ``send_timeout`` on it, so the hot path arms no timer per frame.
        self._send_started: float | None = None
        # fast_acquire: no event-loop round trip per frame when the lock is free (it
        # only ever waits for a heartbeat).
        self._lock = anyio.Lock(fast_acquire=True)

    async def _send_body(self, send: Send, chunk: bytes) -> None:
        async with self._lock:
            self._send_started = time.monotonic()
            try:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                self._send_started = None
            self._last_send = time.monotonic()

    async def _pump(self, send: Send) -> None:
        async with contextlib.aclosing(self.frames):  # type: ignore[type-var]
            async for chunk in self.frames:
                await self._send_body(send, chunk)

    async def _heartbeats(self, send: Send) -> None:
        limit = self.send_timeout if self.send_timeout else math.inf
        while True:
            now = time.monotonic()
            started = self._send_started
            if started is not None:
                # A client that stops reading fills the socket; the send then blocks on
                # flow control. Past the timeout we treat it as gone rather than hold the
                # producer.
                if now - started >= limit:
                    raise TimeoutError("the client stopped reading")
                await anyio.sleep(min(self.heartbeat, started + limit - now))
                continue
            idle_for = now - self._last_send
            if idle_for >= self.heartbeat:
                with anyio.fail_after(limit):
                    await self._send_body(send, encode_comment("ping"))
                continue
            await anyio.sleep(min(self.heartbeat - idle_for, limit))

    @staticmethod
    async def _until_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _race(self, send: Send, receive: Receive) -> None:
        """Pump frames in this task, heartbeats and the disconnect watcher in two plain
        asyncio tasks; whichever ends first ends the others. Not an anyio task group: that
        cost ~11 KB more per open stream (benchmarks/idle_capacity.py, 10,000 streams)."""
        current = asyncio.current_task()
        assert current is not None
        racing = True
        helpers = (
            asyncio.ensure_future(self._heartbeats(send)),
            asyncio.ensure_future(self._until_disconnect(receive)),
        )

        def stop(_: asyncio.Future[None]) -> None:
            if racing:  # a callback already queued when the pump ended must not cancel
                current.cancel()

        for helper in helpers:
            helper.add_done_callback(stop)
        try:
            await self._pump(send)
        except asyncio.CancelledError:
            if not any(helper.done() for helper in helpers):
                raise  # cancelled from outside (server shutdown)
            current.uncancel()
        finally:
            racing = False
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                # A helper's TimeoutError (client stopped reading) or OSError propagates.
                with contextlib.suppress(asyncio.CancelledError):
                    await helper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        raw_headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": raw_headers}
        )
        # A first comment right away: proxies and browsers see the stream is open at once.
        disconnected = False
        try:
            await self._send_body(send, encode_comment("stream open"))
            await self._race(send, receive)
        except (TimeoutError, OSError):
            disconnected = True
        finally:
            with contextlib.suppress(Exception):
                await self.frames.aclose()  # type: ignore[attr-defined]
        if not disconnected:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
