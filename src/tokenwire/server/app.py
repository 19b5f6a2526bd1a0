"""HTTP routes: parse with a protocol, start or read a stream, frame with a transport.

This is the one place where ``errors.py`` exceptions become HTTP statuses and error bodies
(in the shape of the protocol being spoken).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive
from starlette.websockets import WebSocket

from tokenwire.backends.base import Backend
from tokenwire.cache import CACHE_STATUS_KEY, ResponseCache
from tokenwire.config import Settings
from tokenwire.errors import InvalidRequest, Overloaded, TokenwireError
from tokenwire.events import Event
from tokenwire.journal import open_journal
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols import anthropic_messages, native, openai_chat, renderer_for
from tokenwire.requests import ChatRequest
from tokenwire.router import Router
from tokenwire.server import openapi, ui
from tokenwire.server.auth import OWNER_KEY, ApiKeys, RateLimiter, RequestGate, check_owner
from tokenwire.server.limits import check_concurrency, clamp_max_tokens
from tokenwire.server.metrics import CONTENT_TYPE_LATEST, Metrics, queued_in
from tokenwire.server.shutdown import Drain
from tokenwire.stages.coalesce import coalesce_stage, parse_coalesce
from tokenwire.stages.pipeline import build_stages
from tokenwire.streams import Stage, StreamManager
from tokenwire.transports import sse
from tokenwire.transports.websocket import StreamOps, WebSocketSession

__all__ = ["create_app"]

log = logging.getLogger("tokenwire.server")

ErrorShape = Callable[[TokenwireError], dict[str, Any]]
#: What a handler returns: a plain response, or an event stream (an ASGI app of its own).
Reply = Response | sse.EventSourceResponse


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class _App(Starlette):
    """Starlette with ``sse.StreamHandoff`` outermost, outside the error middleware too: an
    event stream, once handed off, sends on the server's own ``send`` (not through the error
    middleware's wrapper) and is resumed through one frame less per chunk. Its response has
    started, so that middleware could only re-raise what the stream raises."""

    def build_middleware_stack(self) -> ASGIApp:
        return sse.StreamHandoff(super().build_middleware_stack())


def error_response(exc: TokenwireError, shape: ErrorShape = openai_chat.error_body) -> Response:
    headers = {}
    if isinstance(exc, Overloaded):
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(shape(exc), status_code=exc.status_code, headers=headers)


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc


def _after(request: Request) -> int:
    """The last seq the client has: ``Last-Event-ID`` header, else ``?after=N``, else -1."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if raw is None or raw == "":
        return -1
    try:
        after = int(raw)
    except ValueError as exc:
        raise InvalidRequest(
            f"Last-Event-ID / after must be an event seq (an integer), not {raw!r}.",
            param="after",
        ) from exc
    if after < -1:
        raise InvalidRequest("after must be >= -1.", param="after")
    return after


class Server:
    """The app's state and handlers; one per process."""

    def __init__(self, settings: Settings, router: Router, manager: StreamManager) -> None:
        self.settings = settings
        self.router = router
        self.manager = manager
        self.drain = Drain(settings.drain_timeout)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)

    def admit(self, connection: Request | WebSocket, chat: ChatRequest) -> str | None:
        """The new stream's owner, once the drain, max_tokens and concurrency limits pass.

        Call right before ``manager.start`` with no ``await`` in between, so the concurrency
        count cannot go stale.
        """
        self.drain.refuse_if_draining()
        owner: str | None = connection.scope.get(OWNER_KEY)
        clamp_max_tokens(chat, self.settings.max_tokens_limit)
        check_concurrency(self.manager.active_streams_of(owner), self.settings.max_streams_per_key)
        return owner

    async def owned_meta(self, connection: Request | WebSocket, stream_id: str) -> StreamMeta:
        """A stream's meta, or 404 when it belongs to another key."""
        meta = await self.manager.meta(stream_id)
        check_owner(meta, connection.scope.get(OWNER_KEY))
        return meta

    # -- helpers -------------------------------------------------------------------------

    def event_stream(
        self, meta: StreamMeta, after: int, headers: dict[str, str] | None = None
    ) -> sse.EventSourceResponse:
        renderer = renderer_for(meta)
        named = getattr(renderer, "event_names", False)
        # A stateful renderer (Anthropic's block indices) re-renders the stream from its
        # start on resume and sends only what follows ``after``.
        start = -1 if getattr(renderer, "needs_history", False) else after
        manager = self.manager

        # The first message tells EventSource-style clients how soon to reconnect. It
        # rides on a data message: a bare `retry:` block is an empty event to the
        # official openai client, which then fails to parse it.
        retry_ms: int | None = 1000
        render = renderer.render
        encode = sse.encode

        def frame(batch: list[Event]) -> bytes:
            nonlocal retry_ms
            parts = []
            for event in batch:
                payloads = render(event)
                if not payloads or event.seq <= after:
                    continue
                for payload in payloads:
                    name = payload["type"] if named and isinstance(payload, dict) else None
                    parts.append(encode(payload, id=event.seq, event=name, retry_ms=retry_ms))
                    retry_ms = None
            return b"".join(parts)

        def direct(batch: list[Event]) -> bool:
            # A live event, in the producer's task: written at once when the connection
            # is free (else it comes through frames() below, rendered once either way).
            return response.send_now(frame, batch)

        async def frames() -> AsyncIterator[bytes]:
            # Every event already journaled goes out in one send (one write syscall).
            async for batch in manager.read_batches(meta.id, start, direct=direct):
                chunk = frame(batch)
                del batch  # an idle stream holds no batch or frame while it waits
                if chunk:
                    yield chunk
                del chunk

        response = sse.EventSourceResponse(
            frames(),
            heartbeat=self.settings.heartbeat,
            send_timeout=self.settings.send_timeout,
            headers={"x-stream-id": meta.id, **(headers or {})},
        )
        return response

    async def collect(self, meta: StreamMeta, receive: Receive) -> list[Event] | None:
        """All events of a stream, or None if the client disconnected first (then the
        stream is cancelled: a non-streaming caller cannot resume)."""
        events: list[Event] = []

        async def read_all() -> None:
            async for event in self.manager.read(meta.id):
                events.append(event)

        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        reading = asyncio.ensure_future(read_all())
        watching = asyncio.ensure_future(until_disconnect())
        try:
            await asyncio.wait({reading, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
        if reading.done():
            reading.result()
            return events
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await self.manager.cancel(meta.id, "disconnect")
        return None

    # -- routes --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Reply:
        chat, wire = openai_chat.parse(await read_json(request))
        owner = self.admit(request, chat)
        meta = await self.manager.start(
            chat,
            protocol=openai_chat.PROTOCOL,
            owner=owner,
            render={"include_usage": chat.include_usage},
        )
        if wire.stream:
            return self.event_stream(meta, after=-1, headers=_cache_header(chat))
        events = await self.collect(meta, request.receive)
        if events is None:
            return Response(status_code=499)
        body = openai_chat.aggregate(meta, events)
        if isinstance(body, TokenwireError):
            return error_response(body)
        return JSONResponse(body, headers={"x-stream-id": meta.id, **_cache_header(chat)})

    async def messages(self, request: Request) -> Reply:
        chat, wire = anthropic_messages.parse(await read_json(request))
        owner = self.admit(request, chat)
        meta = await self.manager.start(chat, protocol=anthropic_messages.PROTOCOL, owner=owner)
        if wire.stream:
            return self.event_stream(meta, after=-1, headers=_cache_header(chat))
        events = await self.collect(meta, request.receive)
        if events is None:
            return Response(status_code=499)
        body = anthropic_messages.aggregate(meta, events)
        if isinstance(body, TokenwireError):
            return error_response(body, anthropic_messages.error_body)
        return JSONResponse(body, headers={"x-stream-id": meta.id, **_cache_header(chat)})

    async def start_native(self, request: Request) -> Reply:
        chat, _ = native.parse(await read_json(request))
        owner = self.admit(request, chat)
        meta = await self.manager.start(chat, protocol=native.PROTOCOL, owner=owner)
        return self.event_stream(meta, after=-1, headers=_cache_header(chat))

    async def resume(self, request: Request) -> Reply:
        after = _after(request)
        meta = await self.owned_meta(request, request.path_params["stream_id"])
        request.app.state.metrics.resumed()
        return self.event_stream(meta, after=after)

    async def cancel(self, request: Request) -> Reply:
        stream_id = request.path_params["stream_id"]
        await self.owned_meta(request, stream_id)
        await self.manager.cancel(stream_id, "stop")
        return JSONResponse({"id": stream_id, "object": "stream.cancel", "cancelled": True})

    async def models(self, request: Request) -> Reply:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
                    for m in self.router.models()
                ],
            }
        )

    async def metrics(self, request: Request) -> Reply:
        body = request.app.state.metrics.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Reply:
        return JSONResponse({"status": "ok", "active_streams": self.manager.active_streams})

    async def websocket(self, websocket: WebSocket) -> None:
        manager = self.manager

        async def start(body: Any) -> str:
            chat, _ = native.parse(body)
            self.limiter.take(websocket.scope.get(OWNER_KEY))
            owner = self.admit(websocket, chat)
            return (await manager.start(chat, protocol=native.PROTOCOL, owner=owner)).id

        async def read(stream_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
            # The socket speaks native events whatever protocol the stream started in.
            async for event in manager.read(stream_id, after):
                yield event.to_dict()

        async def cancel(stream_id: str) -> None:
            await self.owned_meta(websocket, stream_id)
            await manager.cancel(stream_id, "stop")

        async def check(stream_id: str) -> StreamMeta:
            return await self.owned_meta(websocket, stream_id)

        ops = StreamOps(start=start, read=read, cancel=cancel, check=check)
        await WebSocketSession(websocket, ops, send_timeout=self.settings.send_timeout).run()


def _cache_header(chat: ChatRequest) -> dict[str, str]:
    status = chat.extra.get(CACHE_STATUS_KEY)
    return {"x-tokenwire-cache": status} if status else {}


def _handler(
    method: Callable[[Request], Awaitable[Reply]], shape: ErrorShape = openai_chat.error_body
) -> Callable[[Request], Awaitable[Reply]]:
    """Map the error tree to responses once, in the protocol's shape."""

    async def endpoint(request: Request) -> Reply:
        try:
            return await method(request)
        except TokenwireError as exc:
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None:
                metrics.request_error(exc.error_type)
            return error_response(exc, shape)

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods answer in OpenAI's error shape, not Starlette's text."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    if request.url.path.startswith("/v1/messages"):
        message = f"{detail}: {request.method} {request.url.path}"
        error = TokenwireError(message)
        error.status_code = status
        return JSONResponse(anthropic_messages.error_body(error), status_code=status)
    body = {
        "error": {
            "message": f"{detail}: {request.method} {request.url.path}",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=status)


def create_app(
    settings: Settings | None = None,
    *,
    backend: Backend | None = None,
    router: Router | None = None,
) -> Starlette:
    """The ASGI app. ``backend`` replaces the embedded model (tests, gateway-only)."""
    settings = settings or Settings()
    if router is None:
        from tokenwire.gateway import build_router

        if backend is None and not settings.no_embedded:
            from tokenwire.backends.llamacpp import LlamaCppBackend

            backend = LlamaCppBackend.from_settings(settings)
        # The embedded model (or ``backend``) stays the default; upstreams join beside it.
        router = build_router(settings, backend)
    journal = open_journal(
        settings.journal,
        ttl=settings.stream_ttl,
        max_finished=settings.max_finished_streams,
        # Redis bounds its memory with its own maxmemory policy and the stream TTL.
        **(
            {"max_bytes": settings.journal_max_bytes}
            if settings.journal == "memory"
            else {"outage": settings.journal_outage}
        ),
    )
    metrics = Metrics()
    stages: list[Stage] = []
    # Tool calls, server-side tools, structured output, guards (stages/pipeline.py).
    stages.extend(build_stages(settings, router))
    if settings.cache != "off":
        cache = ResponseCache(
            mode=settings.cache,  # type: ignore[arg-type]
            ttl=settings.cache_ttl,
            max_entries=settings.cache_size,
            replay=settings.cache_replay,  # type: ignore[arg-type]
            on_lookup=metrics.cache_lookup,
        )
        # Outside validation and guards: only a stream they let complete is stored, and a
        # hit skips them with the backend.
        stages.append(cache.stage)
    # Outside the cache, so replays are coalesced the same way as live streams.
    stages.append(coalesce_stage(parse_coalesce(settings.coalesce, param="coalesce")))
    manager = StreamManager(
        router,
        journal,
        stages=stages,
        max_stream_bytes=settings.max_stream_bytes,
        disconnect_grace=settings.disconnect_grace,
        observer=metrics,
    )
    metrics.bind(
        active=lambda: manager.active_streams,
        queued=queued_in(router.backends),
        journal_stats=journal.stats,
    )
    server = Server(settings, router, manager)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        await manager.start_background()
        # Everything loaded so far (model, modules) lives as long as the process: keep it out
        # of the collector's full passes, which otherwise stall the loop for 100s of ms
        # once thousands of streams are open (benchmarks/idle_capacity.py).
        gc.collect()
        gc.freeze()
        # Fewer, larger young collections: a heartbeat's objects live one interval and,
        # at the default thresholds, got promoted and triggered multi-second full passes
        # over every open stream's objects at 10,000 streams (benchmarks/README.md).
        gc.set_threshold(50_000, 50, 100)
        server.drain.bind()
        draining = asyncio.create_task(server.drain.watch(manager), name="tokenwire-drain")
        try:
            yield
        finally:
            draining.cancel()
            await manager.close()
            await router.close()

    routes = [
        Route("/v1/chat/completions", _handler(server.chat_completions), methods=["POST"]),
        Route(
            "/v1/messages",
            _handler(server.messages, anthropic_messages.error_body),
            methods=["POST"],
        ),
        Route("/v1/streams", _handler(server.start_native), methods=["POST"]),
        Route("/v1/streams/{stream_id}", _handler(server.resume), methods=["GET"]),
        Route("/v1/streams/{stream_id}/cancel", _handler(server.cancel), methods=["POST"]),
        Route("/v1/models", _handler(server.models), methods=["GET"]),
        Route("/healthz", server.healthz, methods=["GET"]),
        WebSocketRoute("/v1/ws", server.websocket),
        Route("/metrics", server.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
        *ui.routes(),
    ]
    gate = Middleware(
        RequestGate,
        keys=ApiKeys(settings.api_keys),
        limiter=server.limiter,
        max_body_bytes=settings.max_body_bytes,
        metrics_auth=settings.metrics_auth,
        on_reject=lambda exc: metrics.request_error(exc.error_type),
    )
    app = _App(
        routes=routes,
        middleware=[gate],
        lifespan=lifespan,
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.state.server = server
    app.state.metrics = metrics
    return app
