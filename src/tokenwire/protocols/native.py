"""tokenwire's own protocol: the journal's events as they are, the richest format.

``POST /v1/streams`` takes the body of another protocol (the registry passes chat
completions) and streams every event: SSE ``event: <type>``, ``id: <seq>``,
``data: {"type", "seq", …}``. ``GET /v1/streams/{id}`` resumes any stream, whatever protocol
it started in, in that protocol (after ``Last-Event-ID`` or ``?after=N``);
``POST /v1/streams/{id}/cancel`` is Stop. The WebSocket (``GET /v1/ws``, see
transports/websocket.py) sends the same event objects with a ``stream_id``. Errors take the
body protocol's shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.websockets import WebSocket

from tokenwire.errors import TokenwireError
from tokenwire.events import Event
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import (
    Context,
    Endpoint,
    JSONResponse,
    Parsed,
    Reply,
    WireProtocol,
    last_event_id,
)
from tokenwire.protocols.base import Renderer as BaseRenderer
from tokenwire.transports.websocket import StreamOps, WebSocketSession

__all__ = ["Native", "Renderer"]

_STREAM_ID: Mapping[str, Any] = {
    "name": "stream_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}


class Renderer(BaseRenderer):
    #: Frames carry ``event: <payload type>`` so EventSource listeners can subscribe by type.
    event_names = True

    def render(self, event: Event) -> list[dict[str, Any]]:
        return [event.to_dict()]


class Native(WireProtocol):
    """Native events over SSE and WebSocket; requests in ``body``'s wire format."""

    name = "native"

    def __init__(self, body: WireProtocol) -> None:
        self.body = body
        self.request_model = body.request_model
        self.error_schema = body.error_schema

    def routes(self) -> tuple[Endpoint, ...]:
        return (
            Endpoint(
                path="/v1/streams",
                method="POST",
                handler=self.create,
                operation_id="startStream",
                body=self.request_model,
                summary="Native events as SSE",
            ),
            Endpoint(
                path="/v1/streams/{stream_id}",
                method="GET",
                handler=self.resume,
                operation_id="resumeStream",
                parameters=(
                    _STREAM_ID,
                    {"name": "after", "in": "query", "schema": {"type": "integer"}},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                ),
                summary="Replay after the given seq, then live",
            ),
            Endpoint(
                path="/v1/streams/{stream_id}/cancel",
                method="POST",
                handler=self.cancel,
                operation_id="cancelStream",
                parameters=(_STREAM_ID,),
                summary="Stop accepted",
                streams=False,
            ),
            Endpoint(path="/v1/ws", method="WEBSOCKET", handler=self.websocket),
        )

    def parse(self, body: Any) -> Parsed:
        return Parsed(request=self.body.parse(body).request, stream=True)

    def renderer(self, meta: StreamMeta) -> Renderer:
        return Renderer(meta)

    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        return self.body.error_body(exc)

    # -- handlers ----------------------------------------------------------------------

    async def resume(self, ctx: Context, request: Request) -> Reply:
        after = last_event_id(request)
        return await ctx.resume(request, request.path_params["stream_id"], after)

    async def cancel(self, ctx: Context, request: Request) -> Reply:
        stream_id = request.path_params["stream_id"]
        await ctx.owned_meta(request, stream_id)
        await ctx.cancel(stream_id, "stop")
        return JSONResponse({"id": stream_id, "object": "stream.cancel", "cancelled": True})

    async def websocket(self, ctx: Context, websocket: WebSocket) -> None:
        async def start(body: Any) -> str:
            return (await ctx.start(self, self.parse(body), websocket)).id

        async def read(stream_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
            # The socket speaks native events whatever protocol the stream started in.
            async for event in ctx.read(stream_id, after):
                yield event.to_dict()

        async def cancel(stream_id: str) -> None:
            await ctx.owned_meta(websocket, stream_id)
            await ctx.cancel(stream_id, "stop")

        async def check(stream_id: str) -> StreamMeta:
            return await ctx.owned_meta(websocket, stream_id)

        ops = StreamOps(start=start, read=read, cancel=cancel, check=check)
        await WebSocketSession(websocket, ops, send_timeout=ctx.send_timeout).run()
