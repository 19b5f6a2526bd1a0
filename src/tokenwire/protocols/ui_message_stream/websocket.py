"""The UI chat's WebSocket mode: ai@7's ``WebSocketChatTransport`` (``send`` / ``resume`` /
``abort`` frames in; ``chunk{sequence}`` / ``end`` / ``error`` / ``no-active`` out)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import orjson
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tokenwire.errors import InvalidRequest, TokenwireError
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import (
    Context,
)
from tokenwire.protocols.base import Renderer as BaseRenderer

__all__ = ["Answers", "Session"]


class Answers(Protocol):
    """What a session asks of the protocol (``UIMessageStream``): a chat's running answer,
    a new answer, and the renderer of its chunks."""

    async def active_answer(
        self, ctx: Context, connection: HTTPConnection, chat: str
    ) -> StreamMeta | None: ...

    async def start_answer(
        self, ctx: Context, connection: HTTPConnection, body: Any
    ) -> StreamMeta: ...

    def renderer(self, meta: StreamMeta) -> BaseRenderer: ...


class Session:
    """One WebSocket: requests multiplexed by ``requestId``, each a reader of one stream."""

    def __init__(self, protocol: Answers, ctx: Context, websocket: WebSocket) -> None:
        self.protocol = protocol
        self.ctx = ctx
        self.websocket = websocket
        self.pumps: dict[str, asyncio.Task[None]] = {}
        self.streams: dict[str, str] = {}
        self.send_lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.send_lock:
            await asyncio.wait_for(
                self.websocket.send_text(orjson.dumps(frame).decode()), self.ctx.send_timeout
            )

    async def run(self) -> None:
        while True:
            try:
                text = await self.websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                frame = orjson.loads(text)
            except orjson.JSONDecodeError:
                frame = None
            if not isinstance(frame, dict) or not isinstance(frame.get("requestId"), str):
                await self.send({"type": "error", "requestId": "", "errorText": "bad frame"})
                continue
            request_id = frame["requestId"]
            try:
                await self.handle(request_id, frame)
            except TokenwireError as exc:
                await self.send(
                    {"type": "error", "requestId": request_id, "errorText": exc.message}
                )

    async def handle(self, request_id: str, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "abort":
            stream_id = self.streams.get(request_id)
            if stream_id is not None:
                await self.ctx.cancel(stream_id)
            return
        chat = frame.get("id")
        if not isinstance(chat, str) or not chat:
            raise InvalidRequest("id (the chat id) is required.", param="id")
        if kind == "resume":
            meta = await self.protocol.active_answer(self.ctx, self.websocket, chat)
            if meta is None:
                await self.send({"type": "no-active", "requestId": request_id})
                return
            last = frame.get("lastSequence")
            self._pump(request_id, meta, last if isinstance(last, int) else -1)
            return
        if kind != "send":
            raise InvalidRequest(f"unknown frame type {kind!r}.", param="type")
        extra = frame.get("body")
        body: dict[str, Any] = extra if isinstance(extra, dict) else {}
        meta = await self.protocol.start_answer(
            self.ctx,
            self.websocket,
            {
                **body,
                "id": chat,
                "messages": frame.get("messages"),
                "trigger": frame.get("trigger", "submit-message"),
                "messageId": frame.get("messageId"),
            },
        )
        self._pump(request_id, meta, -1)

    def _pump(self, request_id: str, meta: StreamMeta, last_sequence: int) -> None:
        self.streams[request_id] = meta.id
        task = asyncio.ensure_future(self._forward(request_id, meta, last_sequence))
        self.pumps[request_id] = task
        task.add_done_callback(lambda _: self.pumps.pop(request_id, None))

    async def _forward(self, request_id: str, meta: StreamMeta, last_sequence: int) -> None:
        renderer = self.protocol.renderer(meta)
        sequence = -1
        try:
            async for event in self.ctx.read(meta.id):
                for payload in renderer.render(event):
                    if isinstance(payload, str):  # [DONE]: the end frame says it here
                        continue
                    sequence += 1
                    if sequence <= last_sequence:
                        continue
                    chunk = orjson.loads(payload) if isinstance(payload, bytes) else payload
                    await self.send(
                        {
                            "type": "chunk",
                            "requestId": request_id,
                            "sequence": sequence,
                            "chunk": chunk,
                        }
                    )
            await self.send({"type": "end", "requestId": request_id})
        except (WebSocketDisconnect, RuntimeError, TimeoutError, OSError):
            return  # the socket went: a disconnect, the answer goes on (resumable)
        except TokenwireError as exc:
            with contextlib.suppress(Exception):
                await self.send(
                    {"type": "error", "requestId": request_id, "errorText": exc.message}
                )

    async def close(self) -> None:
        for task in list(self.pumps.values()):
            task.cancel()
        for task in list(self.pumps.values()):
            with contextlib.suppress(BaseException):
                await task
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.websocket.close()
