"""The WireProtocol interface: everything a wire (OpenAI chat, Anthropic Messages, …) declares.

A wire protocol is one module under ``protocols/`` plus one line in ``protocols/registry.py``.
The server builds its routes, its error shapes (the auth gate's 401/413/429, unknown routes'
404/405, every handler's errors) and ``/openapi.json`` from the registry; nothing outside the
protocol's module names it. A protocol never calls a model and never writes bytes: it parses
wire bodies into a neutral ``ChatRequest``, renders a stream's events as payloads, and
declares its routes. The server gives its handlers a ``Context`` (start, read, cancel…).

What a protocol declares (``WireProtocol``; see each attribute for details):

- ``name``: stored in ``StreamMeta.protocol``, so a stream resumed on any route and any
  replica renders in the protocol it was started in. Unique in the registry.
- ``routes()``: its ``Endpoint``\\ s, HTTP (any method) or WebSocket. The usual start route
  is ``Endpoint(path, "POST", self.create, …)``: ``create`` is the server's generic handler
  (read JSON, ``parse``, admit, start, then stream or ``aggregate``). Anything else (a GET
  that resumes by id with the wire's own cursor, a cancel, a DELETE, a route that answers
  204) is an ``async def handler(ctx, request) -> Reply`` of the protocol's own.
- ``parse(body) -> Parsed``: the decoded JSON body to a ``ChatRequest``, whether to stream,
  and ``render`` options (JSON-able, stored in ``StreamMeta.render`` so resumes render
  alike). Raise ``InvalidRequest`` (naming the param) for bad input, never anything else.
- ``renderer(meta) -> Renderer``: a new renderer per reader (stateful ones are fine: see
  ``Renderer.needs_history``).
- ``aggregate(meta, events)``: the non-streaming body from a finished stream's events, or
  the ``TokenwireError`` it failed with.
- ``error_body(exc)`` and ``error_schema``: its error shape, and that shape as JSON Schema
  (for ``/openapi.json``). Routes no protocol owns (``/v1/models``…) use the shape of the
  registry's first protocol.
- ``stream_headers``: extra response headers on its event streams (e.g.
  ``x-vercel-ai-ui-message-stream: v1``), besides ``X-Stream-Id`` and the SSE headers.
- ``id_prefix``: how the wire names a stream (``chatcmpl-``, ``msg_``, ``resp_``): ``public_id``
  and ``stream_id`` convert. A stream's position is the journal seq by default (SSE ``id:``,
  ``Last-Event-ID`` or ``?after=N``: ``last_event_id``). A wire whose renderer numbers its
  own payloads (the Responses API's ``sequence_number``: several wire events per journal
  event, dense from 0) declares ``Renderer.position_key``: its positions are then the SSE
  ``id:``\\ s and what ``after`` counts, on every route (its own cursor, ``starting_after``,
  is read in its own handler and passed as ``after``).

A frame's payload (what ``Renderer.render`` returns, one per SSE message): a dict (sent as
compact JSON), ``bytes`` (JSON the renderer encoded itself, one line), or a ``str`` sent as is
(a terminal sentinel such as OpenAI's ``[DONE]``: ``data: [DONE]``). Each message carries
``id: <seq>`` of the event it came from (or the payload's own position, see
``Renderer.position_key``), and ``event: <payload["type"]>`` when the renderer sets
``event_names``.

A minimal protocol::

    class Echo(WireProtocol):
        name = "echo"
        error_schema = {"type": "object"}

        def routes(self) -> Sequence[Endpoint]:
            return (Endpoint("/echo", "POST", self.create, operation_id="echo", body=EchoBody),)

        def parse(self, body: Any) -> Parsed: ...
        def renderer(self, meta: StreamMeta) -> Renderer: return EchoRenderer(meta)
        def error_body(self, exc: TokenwireError) -> dict[str, Any]: return {"error": exc.message}

    PROTOCOL = Echo()          # and in registry.py: PROTOCOLS = (…, echo.PROTOCOL)

Handlers of its own get the ``Context`` and the request::

    async def stop(self, ctx: Context, request: Request) -> Reply:
        meta = await ctx.owned_meta(request, self.stream_id(request.path_params["id"]))
        await ctx.cancel(meta.id)
        return JSONResponse({"id": self.public_id(meta.id), "cancelled": True})

A ``TokenwireError`` raised in any of its handlers becomes a response in its ``error_body``
shape, with the error's status (and ``Retry-After`` when overloaded).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import orjson
from pydantic import BaseModel
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from tokenwire.config import Settings
from tokenwire.errors import InvalidRequest, TokenwireError
from tokenwire.events import Event
from tokenwire.journal.base import StreamMeta
from tokenwire.requests import ChatRequest
from tokenwire.transports.sse import EventSourceResponse

__all__ = [
    "Context",
    "Endpoint",
    "JSONResponse",
    "Parsed",
    "Payload",
    "Renderer",
    "Reply",
    "WireProtocol",
    "last_event_id",
]

#: One SSE message's data: a dict (JSON), bytes (encoded JSON, one line) or a str as is.
Payload = Mapping[str, Any] | str | bytes

#: What a handler returns: a plain response, or an event stream (an ASGI app of its own).
Reply = Response | EventSourceResponse

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "WEBSOCKET"]


class JSONResponse(Response):
    """A JSON response encoded with orjson (what every JSON answer of the server uses)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass(slots=True, kw_only=True)
class Parsed:
    """What ``WireProtocol.parse`` understood of a body."""

    request: ChatRequest
    #: Answer with an event stream (else the generic handler aggregates a JSON body).
    stream: bool = True
    #: JSON-able options the renderer reads from ``StreamMeta.render`` (fixed at start).
    render: dict[str, Any] = field(default_factory=dict)
    #: Generate to the end even with no reader (the disconnect policy does not apply; only
    #: Stop ends it early): the Responses API's ``background: true``.
    background: bool = False


class Renderer(abc.ABC):
    """One stream's events as wire payloads, for one reader (``WireProtocol.renderer``).

    ``render`` is called for every event in seq order, from the first one the reader reads
    (see ``needs_history``), and returns the payloads to send for it (often none). It runs
    on the per-token path: keep it cheap, and never block.
    """

    #: Each message carries ``event: <payload["type"]>`` (Anthropic, native events).
    event_names: ClassVar[bool] = False
    #: The payloads depend on earlier events (Anthropic's block indices): a resume renders
    #: the stream from its start and sends only what follows the client's position.
    needs_history: ClassVar[bool] = False
    #: Event types (``events.EVENT_TYPES`` names) this wire has no place for: it sends
    #: nothing for them, on purpose. Every other type of the vocabulary changes what it sends
    #: (tests/test_protocols.py checks each renderer against ``EVENT_TYPES`` both ways, so a
    #: new event type is a decision for every wire, not a silent drop).
    drops: ClassVar[frozenset[str]] = frozenset()
    #: Positions of the renderer's own, one per payload (the Responses API's
    #: ``sequence_number``): each payload is a dict carrying its position under this key,
    #: which becomes its SSE ``id:`` and is what ``after`` counts in ``event_stream``. Such
    #: a renderer must be deterministic and set ``needs_history`` (a resume re-renders the
    #: stream from its start and skips what the client has). None: journal seqs.
    position_key: ClassVar[str | None] = None

    def __init__(self, meta: StreamMeta) -> None:
        self.meta = meta

    @abc.abstractmethod
    def render(self, event: Event) -> Sequence[Payload]:
        """The payloads for ``event`` (see the module docstring for what a payload is)."""


#: A protocol's HTTP handler: the server's ``Context`` and the request.
Handler = Callable[["Context", Request], Awaitable[Reply]]
#: A protocol's WebSocket handler: accepts, runs and closes the socket itself.
SocketHandler = Callable[["Context", WebSocket], Awaitable[None]]


@dataclass(slots=True, frozen=True, kw_only=True)
class Endpoint:
    """One route of a protocol: ``path`` (Starlette syntax, ``{id}`` parameters), one method.

    Several endpoints may share a path (``GET``/``DELETE /v1/responses/{id}``, or ``POST``
    and ``WEBSOCKET`` on ``/v1/responses``). Errors on it — the handler's, the auth gate's,
    a wrong method's 405 — take the owning protocol's ``error_body`` shape.

    ``operation_id`` puts it in ``/openapi.json`` (None keeps it out, e.g. a WebSocket);
    ``body`` is the pydantic model of its JSON request body, ``parameters`` OpenAPI parameter
    objects, ``summary`` the 200 answer's description and ``streams`` whether that answer
    may be ``text/event-stream``.
    """

    path: str
    method: Method
    handler: Handler | SocketHandler
    operation_id: str | None = None
    body: type[BaseModel] | None = None
    parameters: tuple[Mapping[str, Any], ...] = ()
    summary: str = "OK"
    streams: bool = True


class Context(Protocol):
    """What the server offers a protocol's handlers (server/app.py implements it).

    Streams are owned by the API key that started them: ``owned_meta`` answers another
    key's stream exactly like an unknown one (404), so look streams up through it.
    """

    #: Seconds a send may wait for a client that stopped reading (WebSocket sessions).
    send_timeout: float

    async def read_json(self, request: Request) -> Any:
        """The decoded JSON body; ``InvalidRequest`` when empty or not JSON."""

    async def create(self, protocol: WireProtocol, request: Request) -> Reply:
        """The generic start handler: read JSON, ``protocol.parse``, ``start``, then the
        event stream (``Parsed.stream``) or ``protocol.aggregate`` of the whole stream as
        JSON (499 when the client left first; the stream is then cancelled)."""

    async def start(
        self, protocol: WireProtocol, parsed: Parsed, connection: HTTPConnection
    ) -> StreamMeta:
        """Admit (drain, max_tokens clamp, per-key concurrency) and start a stream in
        ``protocol``; returns once the backend accepted it. Raises the request's error
        (unknown model, overloaded…). On a WebSocket each start also spends a rate-limit
        token (the gate spent one for the handshake only)."""

    def event_stream(
        self,
        meta: StreamMeta,
        after: int = -1,
        *,
        renderer: Renderer | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> EventSourceResponse:
        """The stream as SSE from after seq ``after`` (the renderer's own position when it
        declares ``position_key``): replay, then live, until its terminal event;
        heartbeats, send timeouts and disconnects handled. Rendered by ``renderer``, else by
        a new renderer of the protocol the stream was started in. Carries ``X-Stream-Id``,
        the protocol's ``stream_headers`` and ``headers``."""

    def stream_headers(self, meta: StreamMeta) -> dict[str, str]:
        """Headers a non-streaming answer about ``meta`` carries (``X-Stream-Id`` …)."""

    async def collect(self, meta: StreamMeta, request: Request) -> list[Event] | None:
        """Every event of the stream, waiting for its end; None if the client disconnected
        first (the stream is then cancelled: a non-streaming caller cannot resume)."""

    def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Events after ``after``, replay then live, until the terminal one. While a reader
        is open the stream keeps generating (the disconnect policy counts readers)."""

    async def snapshot(self, stream_id: str) -> list[Event]:
        """The events journaled so far, without waiting for more (poll a stream: the
        last one is terminal once it has ended)."""

    async def delete(self, stream_id: str) -> None:
        """Forget a stream: afterwards it is unknown (404), not expired."""

    async def owned_meta(self, connection: HTTPConnection, stream_id: str) -> StreamMeta:
        """The stream's meta; ``StreamNotFound`` (404) for an unknown id or another key's
        stream, ``StreamExpired`` (410) for one past its retention."""

    async def resume(self, connection: Request, stream_id: str, after: int = -1) -> Reply:
        """``owned_meta``, then ``event_stream`` from ``after`` (counted as a resume)."""

    async def cancel(self, stream_id: str, reason: str = "stop") -> None:
        """Stop the stream wherever it runs (any replica); idempotent. Check ownership first
        (``owned_meta``)."""

    async def name_stream(self, connection: HTTPConnection, name: str, stream_id: str) -> None:
        """Remember ``stream_id`` under a wire's own name for it (the UI message stream's
        chat id), for the API key of ``connection`` (names of different keys never meet),
        on every replica sharing the journal; a later name replaces an earlier one. Kept while
        the stream is retained (``--stream-ttl`` after its end)."""

    async def named_stream(
        self, connection: HTTPConnection, name: str, *, running: bool = True
    ) -> str | None:
        """The stream id this key last named ``name``: while it still runs (``running``,
        on any replica), or while it is retained (``running=False``); else None. Check
        ownership with ``owned_meta`` as for any id."""

    def error_response(self, protocol: WireProtocol, exc: TokenwireError) -> Response:
        """``exc`` as a response in ``protocol``'s error shape (status, ``Retry-After``)."""


class WireProtocol(abc.ABC):
    """One wire protocol (see the module docstring). Instances are stateless singletons."""

    #: Stored in ``StreamMeta.protocol``; unique in the registry.
    name: ClassVar[str]
    #: How the wire names a stream: ``public_id(stream_id) == id_prefix + stream_id``.
    id_prefix: ClassVar[str] = ""
    #: Extra headers on this protocol's event streams.
    stream_headers: ClassVar[Mapping[str, str]] = {}
    #: ``error_body``'s shape as JSON Schema (``/openapi.json``).
    error_schema: Mapping[str, Any]
    #: The pydantic model of the start route's body (what ``parse`` validates), if any.
    request_model: type[BaseModel] | None = None

    @abc.abstractmethod
    def routes(self) -> Sequence[Endpoint]:
        """This protocol's routes."""

    @abc.abstractmethod
    def parse(self, body: Any) -> Parsed:
        """A decoded JSON body, understood; ``InvalidRequest`` naming the param if not."""

    @abc.abstractmethod
    def renderer(self, meta: StreamMeta) -> Renderer:
        """A new renderer for one reader of a stream started in this protocol."""

    @abc.abstractmethod
    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        """``exc`` in this wire's error shape."""

    def aggregate(self, meta: StreamMeta, events: list[Event]) -> dict[str, Any] | TokenwireError:
        """The non-streaming answer from a finished stream's events (or the error it failed
        with). The default refuses: a wire that always streams needs none."""
        raise InvalidRequest(f"The {self.name} protocol only streams.", param="stream")

    async def create(self, ctx: Context, request: Request) -> Reply:
        """The usual start route's handler (``Context.create``)."""
        return await ctx.create(self, request)

    def configured(self, settings: Settings) -> WireProtocol:
        """This protocol with the server's settings applied (a path, a default), for one
        app; the registry keeps the unconfigured singletons. Most protocols have none."""
        return self

    def public_id(self, stream_id: str) -> str:
        return self.id_prefix + stream_id

    def stream_id(self, public_id: str) -> str:
        """The stream id inside a wire id; an id without the prefix is taken as is."""
        prefix = self.id_prefix
        return public_id[len(prefix) :] if prefix and public_id.startswith(prefix) else public_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def last_event_id(request: HTTPConnection) -> int:
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
