"""The Responses API's routes: create, and the stored responses' retrieve, cancel, delete
and input items; the protocol object the registry lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from tokenwire.errors import (
    InvalidRequest,
    StreamExpired,
    StreamNotFound,
    TokenwireError,
    error_from_dict,
)
from tokenwire.events import Event, StreamFailed
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols import openai_chat
from tokenwire.protocols.base import (
    Context,
    Endpoint,
    JSONResponse,
    Parsed,
    Reply,
    WireProtocol,
)
from tokenwire.protocols.openai_responses.renderer import (
    ID_PREFIX,
    ResponsesRenderer,
    history,
    snapshot,
)
from tokenwire.protocols.openai_responses.request import (
    ResponseCreateBody,
    build,
    check,
    parse_body,
)
from tokenwire.protocols.openai_responses.websocket import Session
from tokenwire.requests import Message

__all__ = ["PROTOCOL", "OpenAIResponses"]


def _not_found(public_id: str) -> StreamNotFound:
    return StreamNotFound(f"Response with id '{public_id}' not found.", param="response_id")


class OpenAIResponses(WireProtocol):
    """``/v1/responses`` and its stored responses; errors in OpenAI's shape (Chat's)."""

    name = "openai_responses"
    id_prefix = ID_PREFIX
    error_schema = openai_chat.ERROR_SCHEMA
    request_model = ResponseCreateBody

    def routes(self) -> Sequence[Endpoint]:
        rid = (
            {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}},
        )
        return (
            Endpoint(
                path="/v1/responses",
                method="POST",
                handler=self.create_response,
                operation_id="createResponse",
                body=ResponseCreateBody,
            ),
            Endpoint(path="/v1/responses", method="WEBSOCKET", handler=self.socket),
            Endpoint(
                path="/v1/responses/{response_id}",
                method="GET",
                handler=self.retrieve,
                operation_id="getResponse",
                parameters=(
                    *rid,
                    {"name": "stream", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "starting_after", "in": "query", "schema": {"type": "integer"}},
                ),
            ),
            Endpoint(
                path="/v1/responses/{response_id}",
                method="DELETE",
                handler=self.delete,
                operation_id="deleteResponse",
                parameters=rid,
                streams=False,
            ),
            Endpoint(
                path="/v1/responses/{response_id}/cancel",
                method="POST",
                handler=self.cancel,
                operation_id="cancelResponse",
                parameters=rid,
                streams=False,
            ),
            Endpoint(
                path="/v1/responses/{response_id}/input_items",
                method="GET",
                handler=self.input_items,
                operation_id="listInputItems",
                parameters=rid,
                streams=False,
            ),
        )

    def parse(self, body: Any) -> Parsed:
        """A body with no ``previous_response_id`` (that one needs the journal: ``start``)."""
        checked = parse_body(body)
        check(
            not checked.get("previous_response_id"),
            "previous_response_id needs the server (POST /v1/responses).",
            "previous_response_id",
        )
        return build(checked)

    def renderer(self, meta: StreamMeta) -> ResponsesRenderer:
        return ResponsesRenderer(meta)

    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        return openai_chat.error_body(exc)

    def aggregate(self, meta: StreamMeta, events: list[Event]) -> dict[str, Any] | TokenwireError:
        for event in events:
            if isinstance(event, StreamFailed):
                return error_from_dict(event.error)
        return snapshot(meta, events).response()

    # -- helpers ----------------------------------------------------------------------------

    async def _stored(
        self, ctx: Context, connection: HTTPConnection, public_id: str, *, unstored: str = ""
    ) -> StreamMeta:
        """A response of this protocol owned by the caller; 404 for anything else (another
        key's, another protocol's stream, one not stored unless it is ``unstored``)."""
        try:
            meta = await ctx.owned_meta(connection, self.stream_id(public_id))
        except (StreamNotFound, StreamExpired) as exc:
            # Past its retention a response is gone, as OpenAI says it: 404 (not 410).
            raise _not_found(public_id) from exc
        if meta.protocol != self.name:
            raise _not_found(public_id)
        if not meta.render.get("response", {}).get("store", True) and public_id != unstored:
            raise _not_found(public_id)
        return meta

    async def start_response(
        self, ctx: Context, connection: HTTPConnection, body: Any, last: str = ""
    ) -> tuple[Parsed, StreamMeta]:
        """Start a response from a create body; ``previous_response_id`` may name ``last``
        (the WebSocket connection's last response) even when it was not stored."""
        checked = parse_body(body)
        context: list[Message] | None = None
        previous = checked.get("previous_response_id")
        if previous:
            prev_meta = await self._stored(ctx, connection, previous, unstored=last)
            events = await ctx.snapshot(prev_meta.id)
            if not events or not events[-1].terminal:
                raise InvalidRequest(
                    f"Previous response '{previous}' is still in progress.",
                    param="previous_response_id",
                )
            context = history(prev_meta, events)
        parsed = build(checked, context=context)
        meta = await ctx.start(self, parsed, connection)
        return parsed, meta

    # -- routes -----------------------------------------------------------------------------

    async def create_response(self, ctx: Context, request: Request) -> Reply:
        try:
            parsed, meta = await self.start_response(ctx, request, await ctx.read_json(request))
        except TokenwireError as exc:
            # The SDK retries 5xx/429 by default: a retried create is a second generation.
            failed = ctx.error_response(self, exc)
            failed.headers["x-should-retry"] = "false"
            return failed
        if parsed.stream:
            return ctx.event_stream(meta)
        if parsed.background:
            rendered = snapshot(meta, await ctx.snapshot(meta.id))
            return JSONResponse(rendered.response(), headers=ctx.stream_headers(meta))
        events = await ctx.collect(meta, request)
        if events is None:
            return Response(status_code=499)
        body = self.aggregate(meta, events)
        if isinstance(body, TokenwireError):
            failed = ctx.error_response(self, body)
            failed.headers["x-should-retry"] = "false"
            return failed
        return JSONResponse(body, headers=ctx.stream_headers(meta))

    async def retrieve(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        params = request.query_params
        if params.get("stream", "false").lower() not in ("true", "1"):
            events = await ctx.snapshot(meta.id)
            return JSONResponse(snapshot(meta, events).response(), headers=ctx.stream_headers(meta))
        if not meta.render.get("response", {}).get("background"):
            raise InvalidRequest(
                "Only responses created with background: true can be streamed again.",
                param="stream",
            )
        raw = params.get("starting_after") or request.headers.get("last-event-id")
        after = -1
        if raw not in (None, ""):
            try:
                after = int(raw)
            except ValueError as exc:
                raise InvalidRequest(
                    f"starting_after must be an integer, not {raw!r}.", param="starting_after"
                ) from exc
            check(after >= -1, "starting_after must be >= -1.", "starting_after")
        return await ctx.resume(request, meta.id, after)

    async def cancel(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        if not meta.render.get("response", {}).get("background"):
            raise InvalidRequest(
                "Only responses created with background: true can be cancelled.",
                param="response_id",
            )
        events = await ctx.snapshot(meta.id)
        if events and events[-1].terminal:
            rendered = snapshot(meta, events)
            if rendered.status != "cancelled":
                raise InvalidRequest(
                    f"Cannot cancel a response with status '{rendered.status}'.",
                    param="response_id",
                )
            return JSONResponse(rendered.response(), headers=ctx.stream_headers(meta))
        await ctx.cancel(meta.id, "stop")
        # The final object: read to the terminal event (the producer journals it within a
        # token on the embedded engine, wherever it runs).
        collected = [event async for event in ctx.read(meta.id)]
        return JSONResponse(snapshot(meta, collected).response(), headers=ctx.stream_headers(meta))

    async def delete(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        events = await ctx.snapshot(meta.id)
        if not events or not events[-1].terminal:
            await ctx.cancel(meta.id, "stop")
            async for _ in ctx.read(meta.id):  # until its terminal event is journaled
                pass
        await ctx.delete(meta.id)
        return JSONResponse({"id": public_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        items = list(meta.render.get("input") or [])
        params = request.query_params
        order = params.get("order", "desc")
        check(order in ("asc", "desc"), "order must be asc or desc.", "order")
        if order == "desc":
            items.reverse()
        after = params.get("after")
        if after:
            ids = [item["id"] for item in items]
            check(after in ids, f"No input item '{after}' in this response.", "after")
            items = items[ids.index(after) + 1 :]
        try:
            limit = int(params.get("limit", "20"))
        except ValueError as exc:
            raise InvalidRequest("limit must be an integer.", param="limit") from exc
        check(1 <= limit <= 100, "limit must be from 1 to 100.", "limit")
        page = items[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [{**item, "status": "completed"} for item in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            }
        )

    # -- WebSocket mode ----------------------------------------------------------------------

    async def socket(self, ctx: Context, websocket: WebSocket) -> None:
        """``client.responses.connect()``: ``response.create`` in, the events out."""
        await websocket.accept()
        session = Session(self, self.start_response, ctx, websocket)
        try:
            await session.run()
        finally:
            await session.close()


PROTOCOL = OpenAIResponses()
