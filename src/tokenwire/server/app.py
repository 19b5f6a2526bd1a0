"""HTTP routes: parse with a protocol, start or read a stream, frame with a transport.

This is the one place where ``errors.py`` exceptions become HTTP statuses and error bodies
(in the shape of the protocol being spoken).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route, WebSocketRoute
from starlette.types import ASGIApp, Scope

from tokenwire.backends.base import Backend
from tokenwire.cache import CACHE_LOOKUP_KEY, ResponseCache
from tokenwire.config import Settings
from tokenwire.errors import (
    InvalidRequest,
    MethodNotAllowed,
    Overloaded,
    RouteNotFound,
    StreamExpired,
    StreamNotFound,
    TokenwireError,
)
from tokenwire.events import Event
from tokenwire.journal import open_journal
from tokenwire.journal.base import StreamMeta
from tokenwire.journal.control import ProducerState
from tokenwire.pipeline import build_stages
from tokenwire.protocols.base import (
    Context,
    Handler,
    JSONResponse,
    Parsed,
    Renderer,
    Reply,
    SocketHandler,
    WireProtocol,
)
from tokenwire.protocols.registry import PROTOCOLS
from tokenwire.requests import ChatRequest, parse_coalesce
from tokenwire.router import Router
from tokenwire.server import openapi, ui
from tokenwire.server.auth import OWNER_KEY, ApiKeys, RateLimiter, RequestGate, check_owner
from tokenwire.server.limits import check_concurrency, clamp_max_tokens
from tokenwire.server.metrics import CONTENT_TYPE_LATEST, Metrics, queued_in
from tokenwire.server.shutdown import Drain
from tokenwire.stages import Stage
from tokenwire.stages.coalesce import coalesce_stage
from tokenwire.streams import StreamManager
from tokenwire.transports import sse

__all__ = ["create_app"]

log = logging.getLogger("tokenwire.server")

#: Stream names (``Context.name_stream``) one process keeps when nothing is shared.
_MAX_LOCAL_NAMES = 100_000


class _App(Starlette):
    """Starlette with ``sse.StreamHandoff`` outermost, outside the error middleware too: an
    event stream, once handed off, sends on the server's own ``send`` (not through the error
    middleware's wrapper) and is resumed through one frame less per chunk. Its response has
    started, so that middleware could only re-raise what the stream raises."""

    def build_middleware_stack(self) -> ASGIApp:
        return sse.StreamHandoff(super().build_middleware_stack())


def error_response(exc: TokenwireError, protocol: WireProtocol) -> Response:
    headers = {}
    if isinstance(exc, Overloaded):
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(protocol.error_body(exc), status_code=exc.status_code, headers=headers)


class Server:
    """The app's state and the ``Context`` protocol handlers get; one per process."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        manager: StreamManager,
        metrics: Metrics,
        protocols: Sequence[WireProtocol],
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        #: The protocols spoken, by name (a stream renders in the one it recorded).
        self.protocols = {protocol.name: protocol for protocol in protocols}
        if len(self.protocols) != len(protocols):
            raise ValueError("two protocols share a name")
        #: Its error shape answers for routes no protocol owns.
        self.default = protocols[0]
        self.router = router
        self.manager = manager
        self.metrics = metrics
        self.cache = cache
        self.send_timeout = settings.send_timeout
        self.drain = Drain(settings.drain_timeout)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        #: Stream names (``name_stream``) when nothing is shared (else the control plane).
        self._names: dict[str, str] = {}

    # -- the Context (protocols/base.py) -----------------------------------------------------

    async def read_json(self, request: Request) -> Any:
        body = await request.body()
        if not body:
            raise InvalidRequest("The request body is empty; send a JSON object.")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc

    def admit(self, connection: HTTPConnection, chat: ChatRequest) -> str | None:
        """The new stream's owner, once the drain, max_tokens and concurrency limits pass.

        Call right before ``manager.start`` with no ``await`` in between, so the concurrency
        count cannot go stale.
        """
        self.drain.refuse_if_draining()
        owner: str | None = connection.scope.get(OWNER_KEY)
        clamp_max_tokens(chat, self.settings.max_tokens_limit)
        check_concurrency(self.manager.active_streams_of(owner), self.settings.max_streams_per_key)
        return owner

    async def start(
        self, protocol: WireProtocol, parsed: Parsed, connection: HTTPConnection
    ) -> StreamMeta:
        if connection.scope["type"] == "websocket":
            # The gate spent a token on the handshake; each stream a socket starts spends one.
            self.limiter.take(connection.scope.get(OWNER_KEY))
        owner = self.admit(connection, parsed.request)
        labels: dict[str, str] = {}
        if self.cache is not None:
            # Decided here, once: recorded with the stream, handed down to the cache stage.
            found = self.cache.lookup(parsed.request)
            parsed.request.extra[CACHE_LOOKUP_KEY] = found
            if found is not None:
                labels["cache"] = found.status
        return await self.manager.start(
            parsed.request,
            protocol=protocol.name,
            owner=owner,
            render=parsed.render,
            background=parsed.background,
            labels=labels,
        )

    async def create(self, protocol: WireProtocol, request: Request) -> Reply:
        parsed = protocol.parse(await self.read_json(request))
        meta = await self.start(protocol, parsed, request)
        if parsed.stream:
            return self.event_stream(meta)
        events = await self.collect(meta, request)
        if events is None:
            return Response(status_code=499)
        body = protocol.aggregate(meta, events)
        if isinstance(body, TokenwireError):
            return error_response(body, protocol)
        return JSONResponse(body, headers=self.stream_headers(meta))

    def stream_headers(self, meta: StreamMeta) -> dict[str, str]:
        headers = {"x-stream-id": meta.id}
        cache = meta.labels.get("cache")
        if cache is not None:
            headers["x-tokenwire-cache"] = cache
        return headers

    def event_stream(
        self,
        meta: StreamMeta,
        after: int = -1,
        *,
        renderer: Renderer | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> sse.EventSourceResponse:
        protocol = self.protocols[meta.protocol]
        if renderer is None:
            renderer = protocol.renderer(meta)
        named = renderer.event_names
        # A stateful renderer (Anthropic's block indices) re-renders the stream from its
        # start on resume and sends only what follows ``after``.
        start = -1 if renderer.needs_history else after
        manager = self.manager

        # The first message tells EventSource-style clients how soon to reconnect. It
        # rides on a data message: a bare `retry:` block is an empty event to the
        # official openai client, which then fails to parse it.
        retry_ms: int | None = 1000
        render = renderer.render
        encode = sse.encode

        position_key = renderer.position_key

        def frame(batch: list[Event]) -> bytes:
            nonlocal retry_ms
            parts = []
            if position_key is not None:  # the renderer numbers its payloads itself
                for event in batch:
                    for payload in render(event):
                        assert isinstance(payload, Mapping)  # position_key: dict payloads
                        position: int = payload[position_key]
                        if position <= after:
                            continue
                        name = payload["type"] if named else None
                        parts.append(encode(payload, id=position, event=name, retry_ms=retry_ms))
                        retry_ms = None
                return b"".join(parts)
            for event in batch:
                payloads = render(event)
                if not payloads or event.seq <= after:
                    continue
                for payload in payloads:
                    name = payload["type"] if named and isinstance(payload, Mapping) else None
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
            headers={**self.stream_headers(meta), **protocol.stream_headers, **(headers or {})},
        )
        return response

    async def collect(self, meta: StreamMeta, request: Request) -> list[Event] | None:
        events: list[Event] = []
        receive = request.receive

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

    def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        return self.manager.read(stream_id, after)

    async def snapshot(self, stream_id: str) -> list[Event]:
        return await self.manager.snapshot(stream_id)

    async def delete(self, stream_id: str) -> None:
        await self.manager.delete(stream_id)

    async def owned_meta(self, connection: HTTPConnection, stream_id: str) -> StreamMeta:
        meta = await self.manager.meta(stream_id)
        check_owner(meta, connection.scope.get(OWNER_KEY))
        return meta

    async def resume(self, connection: Request, stream_id: str, after: int = -1) -> Reply:
        meta = await self.owned_meta(connection, stream_id)
        self.metrics.resumed()
        return self.event_stream(meta, after)

    async def cancel(self, stream_id: str, reason: str = "stop") -> None:
        await self.manager.cancel(stream_id, reason)

    def _scoped(self, connection: HTTPConnection, name: str) -> str:
        # Names are per key, like streams: another key's chat id is another chat.
        return f"{connection.scope.get(OWNER_KEY) or '-'}:{name}"

    async def name_stream(self, connection: HTTPConnection, name: str, stream_id: str) -> None:
        key = self._scoped(connection, name)
        control = self.manager.control
        if control.shared:
            await control.name_stream(key, stream_id)
            return
        # Nothing shared: this process keeps the names, a bounded number of them.
        self._names.pop(key, None)
        self._names[key] = stream_id
        while len(self._names) > _MAX_LOCAL_NAMES:
            del self._names[next(iter(self._names))]

    async def named_stream(
        self, connection: HTTPConnection, name: str, *, running: bool = True
    ) -> str | None:
        key = self._scoped(connection, name)
        control = self.manager.control
        stream_id = await control.named_stream(key) if control.shared else self._names.get(key)
        if stream_id is None:
            return None
        if running:
            if self.manager.is_producing(stream_id):
                return stream_id
            if control.shared and await control.end_if_orphaned(stream_id) == ProducerState.ALIVE:
                return stream_id  # produced on another replica
            return None
        try:
            await self.manager.meta(stream_id)
        except (StreamNotFound, StreamExpired):
            return None  # no longer retained
        return stream_id

    def error_response(self, protocol: WireProtocol, exc: TokenwireError) -> Response:
        return error_response(exc, protocol)

    # -- the server's own routes -----------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
                    for m in self.router.models()
                ],
            }
        )

    async def metrics_page(self, request: Request) -> Response:
        body = self.metrics.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "active_streams": self.manager.active_streams})


def _mapped(
    method: Callable[[Request], Awaitable[Reply]], protocol: WireProtocol
) -> Callable[[Request], Awaitable[Reply]]:
    """Map the error tree to responses once, in the protocol's shape."""

    async def endpoint(request: Request) -> Reply:
        try:
            return await method(request)
        except TokenwireError as exc:
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None:
                metrics.request_error(exc.error_type)
            return error_response(exc, protocol)

    return endpoint


def _protocol_routes(server: Server) -> list[tuple[BaseRoute, WireProtocol]]:
    """Every protocol's endpoints as Starlette routes, each with the protocol it belongs to."""
    context: Context = server  # mypy checks here that Server implements the Context
    routes: list[tuple[BaseRoute, WireProtocol]] = []
    for protocol in server.protocols.values():
        for endpoint in protocol.routes():
            route: BaseRoute
            if endpoint.method == "WEBSOCKET":
                socket_handler = cast(SocketHandler, endpoint.handler)
                route = WebSocketRoute(endpoint.path, functools.partial(socket_handler, context))
            else:
                handler = cast(Handler, endpoint.handler)
                route = Route(
                    endpoint.path,
                    _mapped(functools.partial(handler, context), protocol),
                    methods=[endpoint.method],
                )
            routes.append((route, protocol))
    return routes


class _Owners:
    """Which protocol a request is for, by route matching (not by URL prefix): its error
    shape answers the gate's rejections and unknown methods."""

    def __init__(self, routes: list[tuple[BaseRoute, WireProtocol]]) -> None:
        self.routes = routes

    def __call__(self, scope: Scope) -> WireProtocol | None:
        partial: WireProtocol | None = None
        for route, protocol in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return protocol
            if match is Match.PARTIAL and partial is None:
                partial = protocol  # the path is the protocol's, the method is not
        return partial


def _http_error(
    owners: _Owners, default: WireProtocol
) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        """Unknown routes and methods answer in the owning protocol's error shape (the
        default protocol's where no protocol owns the path), not Starlette's text."""
        detail = getattr(exc, "detail", "error")
        message = f"{detail}: {request.method} {request.url.path}"
        error = MethodNotAllowed(message) if getattr(exc, "status_code", 0) == 405 else None
        return error_response(error or RouteNotFound(message), owners(request.scope) or default)

    return handle


def create_app(
    settings: Settings | None = None,
    *,
    backend: Backend | None = None,
    router: Router | None = None,
    protocols: Sequence[WireProtocol] = PROTOCOLS,
) -> Starlette:
    """The ASGI app. ``backend`` replaces the embedded model (tests, gateway-only);
    ``protocols`` the registry (``protocols/registry.py``)."""
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
    # Tool calls, server-side tools, structured output, guards (pipeline.py).
    stages.extend(build_stages(settings, router))
    cache: ResponseCache | None = None
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
    # Each protocol with this app's settings applied (a path, a default).
    protocols = tuple(protocol.configured(settings) for protocol in protocols)
    server = Server(settings, router, manager, metrics, protocols, cache)

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

    owned = _protocol_routes(server)
    owners = _Owners(owned)
    routes: list[BaseRoute] = [
        *(route for route, _ in owned),
        Route("/v1/models", _mapped(server.models, server.default), methods=["GET"]),
        Route("/healthz", server.healthz, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
        *ui.routes(),
    ]
    gate = Middleware(
        RequestGate,
        keys=ApiKeys(settings.api_keys),
        limiter=server.limiter,
        max_body_bytes=settings.max_body_bytes,
        metrics_auth=settings.metrics_auth,
        protocol_of=owners,
        default=server.default,
        on_reject=lambda exc: metrics.request_error(exc.error_type),
    )
    handle_http_error = _http_error(owners, server.default)
    app = _App(
        routes=routes,
        middleware=[gate],
        lifespan=lifespan,
        exception_handlers={404: handle_http_error, 405: handle_http_error},
    )
    app.state.server = server
    app.state.protocols = tuple(protocols)
    app.state.metrics = metrics
    return app
