"""The Responses API's WebSocket mode: ``response.create`` frames in, the events out.

``client.responses.connect()`` speaks it on ``/v1/responses``: one response in flight per
connection, the same event objects as the SSE stream (with the frame's ``stream_id`` lane,
when it named one); ``previous_response_id`` may name the connection's last response even
when it was not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from tokenwire.errors import InvalidRequest, TokenwireError
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import Context, Parsed, WireProtocol

__all__ = ["Session", "Start"]

#: Starts a response from a create body (``OpenAIResponses.start_response``): ``last`` is the
#: connection's last response id, which ``previous_response_id`` may name unstored.
Start = Callable[[Context, HTTPConnection, Any, str], Awaitable[tuple[Parsed, StreamMeta]]]


class Session:
    """One WebSocket connection: one response in flight at a time."""

    def __init__(
        self, protocol: WireProtocol, start: Start, ctx: Context, websocket: WebSocket
    ) -> None:
        self.protocol = protocol
        self.start = start
        self.ctx = ctx
        self.websocket = websocket
        self.last = ""  # the connection's last response id
        self.flight: asyncio.Task[None] | None = None
        self.flight_id = ""
        self.send_lock = asyncio.Lock()

    async def send(self, payload: Any) -> None:
        async with self.send_lock:
            await asyncio.wait_for(
                self.websocket.send_text(orjson.dumps(payload).decode()), self.ctx.send_timeout
            )

    async def error(self, exc: TokenwireError, lane: Any = None) -> None:
        frame: dict[str, Any] = {
            "type": "error",
            "status": exc.status_code,
            "error": {
                "type": exc.error_type,
                "code": exc.code,
                "message": exc.message,
                "param": exc.param,
            },
        }
        if lane is not None:
            frame["stream_id"] = lane
        await self.send(frame)

    async def run(self) -> None:
        while True:
            try:
                raw = await self.websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError, KeyError):
                return
            try:
                frame = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await self.error(InvalidRequest("A frame must be a JSON object."))
                continue
            if not isinstance(frame, dict) or frame.get("type") != "response.create":
                kind = frame.get("type") if isinstance(frame, dict) else None
                await self.error(
                    InvalidRequest(f"Unsupported event type {kind!r}: send response.create.")
                )
                continue
            lane = frame.get("stream_id")
            if self.flight is not None and not self.flight.done():
                await self.error(
                    InvalidRequest(
                        "A response is already in progress on this connection: wait for its "
                        "terminal event (one response in flight per connection)."
                    ),
                    lane,
                )
                continue
            body = {k: v for k, v in frame.items() if k not in ("type", "stream_id", "stream")}
            if body.get("generate", True) is False:
                await self.error(
                    InvalidRequest("generate: false is not supported.", param="generate"), lane
                )
                continue
            body.pop("generate", None)
            if body.get("background"):
                await self.error(
                    InvalidRequest(
                        "background is not supported over WebSocket.", param="background"
                    ),
                    lane,
                )
                continue
            try:
                _, meta = await self.start(self.ctx, self.websocket, body, self.last)
            except TokenwireError as exc:
                await self.error(exc, lane)
                continue
            self.last = self.flight_id = self.protocol.public_id(meta.id)
            self.flight = asyncio.create_task(self._relay(meta, lane))

    async def _relay(self, meta: StreamMeta, lane: Any) -> None:
        renderer = self.protocol.renderer(meta)
        try:
            async for event in self.ctx.read(meta.id):
                for payload in renderer.render(event):
                    if lane is not None:
                        payload = {**payload, "stream_id": lane}  # type: ignore[dict-item]
                    await self.send(payload)
        except TokenwireError as exc:
            await self.error(exc, lane)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            # A client that stopped reading (send timeout) or left: end the connection,
            # and with it this response (``close``).
            with contextlib.suppress(Exception):
                await self.websocket.close(code=1011)

    async def close(self) -> None:
        """The connection is gone: a response still in flight stops (a foreground one)."""
        flight = self.flight
        if flight is None or flight.done():
            if flight is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    flight.result()
            return
        flight.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await flight
        with contextlib.suppress(TokenwireError):
            await self.ctx.cancel(self.protocol.stream_id(self.flight_id), "disconnect")
