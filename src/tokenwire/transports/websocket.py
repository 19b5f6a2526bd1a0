"""WebSocket transport (``GET /v1/ws``): several streams on one socket, native events as JSON.

Client messages (JSON text):

- ``{"type": "start", "request": {…chat-completions body…}, "ref": any?}`` starts a stream;
  its events follow, the first (``stream.started``) echoing ``ref`` so a client with several
  starts in flight can tell which is which.
- ``{"type": "resume", "stream_id": "…", "after": seq}`` replays the events after ``seq``
  (default -1: all), then follows live; replaces this socket's reader of that stream, if any.
- ``{"type": "cancel", "stream_id": "…"}`` is Stop, from any socket or replica; answered with
  ``{"type": "cancel.accepted", "stream_id"}``; the stream's readers get ``stream.cancelled``.
- ``{"type": "ping"}`` is answered with ``{"type": "pong"}``.

Server messages: every event as ``{"stream_id", "type", "seq", …fields}`` (``text.delta`` has
``text``), and errors as ``{"type": "error", "error": {"type", "message", "code"},
"stream_id"?, "ref"?}``. Bad input is an error message, never a closed socket or a crash.

Promises:
- closing the socket (or the network dropping it) detaches its readers exactly like an SSE
  disconnect: the stream manager's disconnect policy decides whether generation goes on;
- keepalive: uvicorn sends protocol-level pings (``ws_ping_interval``) and drops a peer that
  stops answering; clients that cannot see those frames (browsers) can send ``ping``;
- a client that stops reading is dropped after ``send_timeout`` seconds rather than holding
  memory: its streams go on and it can resume them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketState

from tokenwire.errors import InvalidRequest, TokenwireError

__all__ = ["StreamOps", "WebSocketSession"]

log = logging.getLogger("tokenwire.transports.websocket")


class _Gone(Exception):
    """The socket can no longer be written to."""


@dataclass(slots=True)
class StreamOps:
    """What a socket may do with streams; the server wires these to its StreamManager."""

    #: Start a stream from a chat body; returns its id. Raises ``TokenwireError``.
    start: Callable[[Any], Awaitable[str]]
    #: Event payloads (``{"type", "seq", …}``) after ``after``, replay then live.
    read: Callable[[str, int], AsyncIterator[dict[str, Any]]]
    cancel: Callable[[str], Awaitable[None]]
    #: Raises ``StreamNotFound`` / ``StreamExpired`` for a stream that cannot be read.
    check: Callable[[str], Awaitable[object]]


class WebSocketSession:
    def __init__(
        self,
        websocket: WebSocket,
        ops: StreamOps,
        *,
        send_timeout: float | None = 30.0,
        max_streams: int = 32,
    ) -> None:
        self.websocket = websocket
        self.ops = ops
        self.send_timeout = send_timeout
        self.max_streams = max_streams
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()
        self._closed = asyncio.Event()

    async def run(self) -> None:
        await self.websocket.accept()
        receiving = asyncio.ensure_future(self._receive_loop())
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({receiving, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiving, closing, *self._tasks):
                task.cancel()
            # Readers' finally blocks run now: the disconnect policy sees them leave.
            for task in (receiving, closing, *self._tasks):
                with contextlib.suppress(BaseException):
                    await task
            if self.websocket.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await self.websocket.close()

    # -- sending -----------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message).decode()
        try:
            async with self._send_lock:
                with_timeout = self.send_timeout if self.send_timeout else math.inf
                await asyncio.wait_for(self.websocket.send_text(data), with_timeout)
        except (TimeoutError, OSError, RuntimeError) as exc:
            # Slow or gone: drop the socket; the streams go on and can be resumed.
            log.info("websocket send failed (%s); closing", type(exc).__name__)
            self._closed.set()
            raise _Gone from exc

    async def send_error(
        self, exc: TokenwireError, *, stream_id: str | None = None, ref: Any = None
    ) -> None:
        message: dict[str, Any] = {"type": "error", "error": exc.to_dict()}
        if stream_id is not None:
            message["stream_id"] = stream_id
        if ref is not None:
            message["ref"] = ref
        await self.send(message)

    # -- receiving ---------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            try:
                await self._handle(raw)
            except TokenwireError as exc:
                await self.send_error(exc)

    async def _handle(self, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"Messages must be JSON objects: {exc}") from exc
        if not isinstance(message, dict):
            raise InvalidRequest("Messages must be JSON objects with a 'type'.")
        kind = message.get("type")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "start":
            if len(self._readers) >= self.max_streams:
                raise InvalidRequest(
                    f"At most {self.max_streams} streams may be read at once on one socket."
                )
            self._spawn(self._start(message.get("request"), message.get("ref")))
        elif kind == "resume":
            stream_id = _stream_id(message)
            after = message.get("after", -1)
            if isinstance(after, bool) or not isinstance(after, int) or after < -1:
                raise InvalidRequest("'after' must be an event seq (an integer >= -1).")
            try:
                await self.ops.check(stream_id)
            except TokenwireError as exc:
                await self.send_error(exc, stream_id=stream_id)
                return
            self._follow(stream_id, after, None)
        elif kind == "cancel":
            stream_id = _stream_id(message)
            try:
                await self.ops.cancel(stream_id)
            except TokenwireError as exc:
                await self.send_error(exc, stream_id=stream_id)
                return
            await self.send({"type": "cancel.accepted", "stream_id": stream_id})
        else:
            raise InvalidRequest(
                f"Unknown message type {kind!r}: use start, resume, cancel or ping."
            )

    # -- streams -----------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start(self, body: Any, ref: Any) -> None:
        try:
            stream_id = await self.ops.start(body)
        except TokenwireError as exc:
            with contextlib.suppress(_Gone):
                await self.send_error(exc, ref=ref)
            return
        self._follow(stream_id, -1, ref)

    def _follow(self, stream_id: str, after: int, ref: Any) -> None:
        previous = self._readers.pop(stream_id, None)
        if previous is not None:
            previous.cancel()
        self._readers[stream_id] = self._spawn(self._read(stream_id, after, ref, previous))

    async def _read(
        self, stream_id: str, after: int, ref: Any, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            # Its last message must go out before this reader's first one.
            with contextlib.suppress(BaseException):
                await previous
        try:
            async for payload in self.ops.read(stream_id, after):
                message = {"stream_id": stream_id, **payload}
                if ref is not None:
                    message["ref"] = ref
                    ref = None
                await self.send(message)
        except TokenwireError as exc:
            with contextlib.suppress(_Gone):
                await self.send_error(exc, stream_id=stream_id)
        except _Gone:
            pass
        finally:
            if self._readers.get(stream_id) is asyncio.current_task():
                del self._readers[stream_id]


def _stream_id(message: dict[str, Any]) -> str:
    stream_id = message.get("stream_id")
    if not isinstance(stream_id, str) or not stream_id:
        raise InvalidRequest("'stream_id' must be a non-empty string.")
    return stream_id
