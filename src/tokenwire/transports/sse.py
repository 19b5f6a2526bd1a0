"""Server-Sent Events: framing, heartbeats, send timeouts and disconnect detection.

All SSE bytes tokenwire writes are made here. ``EventSourceResponse`` is an ASGI response that
sends the frames of an async iterator, a heartbeat comment whenever the stream has been idle
for ``heartbeat`` seconds, and listens for the client's disconnect. Whichever ends first ends
the others, and the frame iterator is always closed, so its ``finally`` blocks (the reader
count) run at once. A send that the client does not take within ``send_timeout`` seconds (it
stopped reading and the socket filled) ends the stream as a disconnect.

What an open stream costs is what bounds how many idle streams a process holds
(benchmarks/idle_capacity.py: ~17.5 KB each at 10,000, its --breakdown says where it goes), so
an idle stream is kept lean:

- one task of its own (the request's) pumping frames, plus one waiting for the disconnect;
- no timer or task per stream for heartbeats: one ``HeartbeatScheduler`` per event loop keeps
  the streams in 5 ms buckets of their next due time, and a bucket's single timer pings the
  streams in it that are idle by then (each ping a short task, so a client that stopped
  reading cannot delay the others). Sending a frame only records the time: the bucket
  re-files a stream that sent since;
- ``StreamHandoff`` (the app's outermost middleware) runs the stream after the routing,
  middleware and handler frames have returned, instead of under them for its whole life.

Headers go out when the stream starts and heartbeats count from then: when the server offers
a direct write, the headers, the opening comment and the first frame are held until the
first frame is sent or the loop's next step, whichever comes first, so a first frame that is
ready with the headers goes in the same write, and a slow one delays nothing.

A live frame need not wait for the stream's task to wake: ``send_now`` writes it from the
task that produced it (the journal's direct delivery) when the server offers a direct write
(``DIRECT_WRITE_KEY``, server/http.py) and nothing else is being sent. That saves a loop
step per chunk; anything that cannot go at once (flow control, a ping in progress) goes the
usual way, through ``send``.

Divergence from starlette's ``StreamingResponse`` and sse-starlette (STYLE.md): they race
the same three things with an anyio task group per stream, ~11 KB more per open stream;
sse-starlette also patches uvicorn at import time to see shutdown, which we avoid.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DIRECT_WRITE_KEY",
    "STREAM_HEADERS",
    "DirectWrite",
    "EventSourceResponse",
    "HeartbeatScheduler",
    "StreamHandoff",
    "encode",
    "encode_comment",
]

log = logging.getLogger("tokenwire.transports.sse")

#: Headers every streaming response carries: no caching, no proxy buffering, no compression.
STREAM_HEADERS = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
    "connection": "keep-alive",
}

#: The scope key under which ``StreamHandoff`` offers to run a stream (a one-slot list).
HANDOFF_KEY = "tokenwire.sse.handoff"

#: The scope key under which a server offers a ``DirectWrite`` for the response body.
DIRECT_WRITE_KEY = "tokenwire.direct_write"

_T = TypeVar("_T")


@runtime_checkable
class DirectWrite(Protocol):
    """A server's synchronous body write, for frames sent from outside the stream's task.

    The reader's half of the fast path (``backends.base.PushSource`` is the producer's): a
    server offers one in the scope under ``DIRECT_WRITE_KEY`` (server/http.py does), and
    ``EventSourceResponse.send_now`` uses it when nothing else is being sent.
    """

    def ready(self) -> bool:
        """Whether a body chunk written now goes out at once (the response is started and
        not complete, the client is connected, and flow control does not hold writes)."""

    def write(self, body: bytes) -> None:
        """Write one body chunk (only after ``ready()``)."""

    def hold(self) -> None:
        """Hold the response's writes until ``release()``, or the loop's next step at the
        latest (so that what is ready together goes out in one write)."""

    def release(self) -> None:
        """Write what was held; from now on writes go out at once."""


#: ``isinstance(…, DirectWrite)`` per type (a runtime-checkable Protocol's check walks its
#: attributes every time on Python 3.11: ~15 µs per request).
_DIRECT_WRITES: dict[type, bool] = {}


def _is_direct_write(writer: object) -> bool:
    known = _DIRECT_WRITES.get(type(writer))
    if known is None:
        known = _DIRECT_WRITES[type(writer)] = isinstance(writer, DirectWrite)
    return known


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


_OPEN: Message = {
    "type": "http.response.body",
    "body": encode_comment("stream open"),
    "more_body": True,
}
_PING: Message = {"type": "http.response.body", "body": encode_comment("ping"), "more_body": True}
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}

# Why a stream was ended from outside its pump.
_DISCONNECT, _TIMEOUT, _FAILED = "disconnect", "timeout", "failed"


class HeartbeatScheduler:
    """Due-time checks for every open event stream of one event loop.

    Streams are filed in buckets of ``TICK`` seconds by the loop time of their next check;
    one ``call_at`` timer per non-empty bucket (not per stream) runs ``_check`` on each
    stream in it, which pings, enforces the send timeout, or files the stream again. A check
    runs at most ``TICK`` late, never early.
    """

    TICK = 0.005
    __slots__ = ("__weakref__", "_buckets", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, list[EventSourceResponse]] = {}

    def file(self, stream: EventSourceResponse, when: float) -> None:
        """Check ``stream`` at loop time ``when`` (``inf``: never)."""
        if when == math.inf:
            return
        key = math.ceil(when / self.TICK)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [stream]
            self._loop.call_at(key * self.TICK, self._fire, key)
        else:
            bucket.append(stream)

    def _fire(self, key: int) -> None:
        bucket = self._buckets.pop(key, None)
        if bucket:
            now = self._loop.time()
            for stream in bucket:
                try:
                    stream._check(now)
                except Exception:  # one stream's bug must not stop the others' heartbeats
                    log.exception("heartbeat check failed")

    def __len__(self) -> int:
        """Streams filed (closed ones included until their bucket fires)."""
        return sum(len(bucket) for bucket in self._buckets.values())


_schedulers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HeartbeatScheduler] = (
    weakref.WeakKeyDictionary()
)


def heartbeat_scheduler(loop: asyncio.AbstractEventLoop | None = None) -> HeartbeatScheduler:
    """The scheduler of ``loop`` (default: the running loop)."""
    loop = loop or asyncio.get_running_loop()
    scheduler = _schedulers.get(loop)
    if scheduler is None:
        scheduler = _schedulers[loop] = HeartbeatScheduler(loop)
    return scheduler


class StreamHandoff:
    """ASGI middleware, outermost: event streams run here, after the app has returned.

    An ``EventSourceResponse`` sends its headers through the layers that built it (so any
    header-adding middleware still applies), then, when this middleware offered, leaves its
    body to run here, with the server's own ``receive``/``send``. The routing, exception
    and auth layers' frames, the request object and the handler's locals are then freed
    instead of held for the stream's whole life. Middleware that rewrites bodies is
    bypassed, which event streams want anyway (never compressed, never buffered).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot: list[EventSourceResponse] = []
        scope[HANDOFF_KEY] = slot
        try:
            await self.app(scope, receive, send)
        except BaseException:
            if slot:  # an outer layer failed after the headers: the body never runs
                with contextlib.suppress(Exception):
                    await slot.pop().frames.aclose()  # type: ignore[attr-defined]
            raise
        if slot:
            stream = slot.pop()
            del scope[HANDOFF_KEY]
            # The server's own send: its direct write is the same channel.
            writer = scope.get(DIRECT_WRITE_KEY)
            await stream.stream(receive, send, writer if _is_direct_write(writer) else None)


class EventSourceResponse:
    media_type = "text/event-stream"
    __slots__ = (
        "_closed",
        "_failure",
        "_last_send",
        "_loop",
        "_pinging",
        "_send",
        "_send_started",
        "_task",
        "_watcher",
        "_writer",
        "frames",
        "headers",
        "heartbeat",
        "send_timeout",
        "status_code",
    )

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._send: Send | None = None
        self._last_send = 0.0
        #: When the send in progress started (None: none in progress); the scheduler
        #: enforces ``send_timeout`` on it, so the hot path arms no timer per frame.
        self._send_started: float | None = None
        self._pinging: asyncio.Task[None] | None = None
        self._watcher: asyncio.Future[Message] | None = None
        self._failure: str | None = None
        self._closed = False
        self._writer: DirectWrite | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        raw_headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
        slot = scope.get(HANDOFF_KEY)
        writer = scope.get(DIRECT_WRITE_KEY)
        if writer is not None and slot is not None and not slot:
            # Headers, the opening comment and a first frame that is ready with them go
            # out in one write; at the loop's next step at the latest (``DirectWrite.hold``).
            writer.hold()
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": raw_headers}
        )
        self.headers.clear()  # sent: an open stream holds no copy
        if slot is not None and not slot:
            slot.append(self)  # StreamHandoff runs the body once the app has returned
            return
        await self.stream(receive, send)

    async def stream(self, receive: Receive, send: Send, writer: DirectWrite | None = None) -> None:
        """The body: frames, heartbeats and the disconnect watch, until one of them ends.
        ``writer``: the server's direct write for ``send``'s connection (``send_now``)."""
        loop = self._loop = asyncio.get_running_loop()
        task = self._task = asyncio.current_task()
        assert task is not None
        self._send = send
        self._writer = writer
        watcher = self._watch(receive)
        frames = self.frames
        try:
            # A first comment right away: proxies and browsers see the stream is open at once.
            await self._send_body(send, _OPEN)
            heartbeat_scheduler(loop).file(self, self._next_check(loop.time()))
            time = loop.time
            held = writer  # headers and the opening comment wait for the first frame
            async for chunk in frames:
                # ``_send_body`` inlined: no coroutine of its own per frame.
                if self._pinging is not None:
                    await self._pinging  # a ping held up by flow control goes first
                self._send_started = time()
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finally:
                    self._send_started = None
                if held is not None:
                    held.release()  # all three in one write
                    held = None
                self._last_send = time()
                del chunk  # an idle stream holds no frame while it waits
        except asyncio.CancelledError:
            if self._failure is None:
                raise  # cancelled from outside (server shutdown)
            task.uncancel()
        except OSError:
            self._failure = _FAILED
        finally:
            # Before any await: from here on nothing may cancel this task on our behalf.
            self._closed = True
            if writer is not None:
                writer.release()
            # The scheduler may hold this object until the stream's bucket fires: keep
            # nothing of the connection alive through it.
            self._send = self._task = self._watcher = self._writer = None
            watcher.cancel()
            if self._pinging is not None:
                self._pinging.cancel()
            with contextlib.suppress(Exception):
                await frames.aclose()  # type: ignore[attr-defined]
        if self._failure in (None, _DISCONNECT):
            with contextlib.suppress(OSError):
                await send(_END)

    def send_now(self, render: Callable[[_T], bytes], item: _T) -> bool:
        """Send ``render(item)`` at once from the running task, whichever it is, if the
        stream is open and idle between frames (no send or ping in progress) and the
        server's direct write is ready. Otherwise return False without calling ``render``
        (so a stateful renderer sees each item once), and the frame goes the usual way."""
        writer = self._writer
        if (
            writer is None
            or self._send_started is not None
            or self._pinging is not None
            or self._failure is not None
            or not writer.ready()
        ):
            return False
        body = render(item)
        if body:
            writer.write(body)
            assert self._loop is not None
            self._last_send = self._loop.time()
        return True

    async def _send_body(self, send: Send, message: Message) -> None:
        if self._pinging is not None:
            await self._pinging  # a ping held up by flow control goes first
        loop = self._loop
        assert loop is not None
        self._send_started = loop.time()
        try:
            await send(message)
        finally:
            self._send_started = None
        self._last_send = loop.time()

    def _watch(self, receive: Receive) -> asyncio.Future[Message]:
        """Wait for the disconnect: ``receive()`` itself is the task (no coroutine of ours
        around it), and its done callback reads the message."""
        watcher = self._watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(functools.partial(self._received, receive))
        return watcher

    def _received(self, receive: Receive, watcher: asyncio.Future[Message]) -> None:
        if watcher.cancelled() or watcher is not self._watcher:
            return
        exc = watcher.exception()
        if exc is None and watcher.result()["type"] != "http.disconnect":
            self._watch(receive)  # more request body (unread by the route): keep listening
            return
        self._abort(_DISCONNECT)  # a broken receive channel is a gone client too

    def _abort(self, reason: str) -> None:
        """End the stream from outside its pump (disconnect, timeout, failed ping)."""
        if self._closed or self._failure is not None or self._task is None:
            return
        self._failure = reason
        self._task.cancel()

    # -- heartbeats and the send timeout (called by the scheduler) ----------------------------

    def _next_check(self, now: float) -> float:
        started = self._send_started
        limit = self.send_timeout or math.inf
        every = self.heartbeat if self.heartbeat > 0 else math.inf
        if started is not None:
            return min(started + limit, now + every)
        due = self._last_send + every
        return due if due != math.inf else now + limit

    def _check(self, now: float) -> None:
        if self._closed:
            return
        started = self._send_started
        if started is not None and now - started >= (self.send_timeout or math.inf):
            # A client that stops reading fills the socket; the send then blocks on flow
            # control. Past the timeout we treat it as gone rather than hold the producer.
            self._abort(_TIMEOUT)
            return
        if started is None and self.heartbeat > 0 and now - self._last_send >= self.heartbeat:
            assert self._loop is not None and self._send is not None
            self._pinging = self._loop.create_task(self._ping(self._send))
            # The ping counts from now, not from when its task has sent it: the next
            # check then lands one interval on, not one bucket past it.
            self._send_started = self._last_send = now
        heartbeat_scheduler(self._loop).file(self, self._next_check(now))

    async def _ping(self, send: Send) -> None:
        try:
            await send(_PING)
        except asyncio.CancelledError:
            raise
        except Exception:  # the server could not write: the client is gone
            self._abort(_FAILED)
        finally:
            self._send_started = None
            self._pinging = None
