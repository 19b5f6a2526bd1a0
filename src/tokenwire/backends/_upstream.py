"""What every upstream backend shares: config, pooled httpx client, decoding, timeouts.

An upstream backend (``openai.py``, ``anthropic.py``) only says how to build the request body
and how to turn the upstream's SSE messages into events (a ``WireDecoder``). This module
runs one attempt against one upstream (``UpstreamCall``) and promises:

- the upstream's bytes are parsed incrementally (``SSEDecoder``): each byte is scanned once,
  and the events of a network read are handed on the moment the read returns; the body is
  read through ``UpstreamTransport`` (``_transport.py``: httpx over pooled asyncio
  connections, de-chunked by llhttp), which hands over all bytes received in one piece;
- ``opened`` resolves when the upstream answered 2xx; refused connections, 5xx and timeouts
  raise ``BackendUnavailable`` / ``BackendTimeout``, a 4xx the client caused raises
  ``InvalidRequest`` (the gateway fails over on the former, never on the latter);
- up to the first token a task of the call's own reads (so the gateway can wait for it with
  a deadline); from then on the consumer reads in its own task, so a chunk goes from the
  socket to the journal with no hand-off between tasks; given a sink (``push_to``), the
  events of each read go to it in the network callback itself, with no task woken at all;
- a first-token deadline, then an inter-token idle deadline (time spent waiting on the
  upstream), both kept by one timer that is re-armed only when it fires (no per-chunk
  timer cost);
- Stop (the ``CancelToken``), a timeout or closing the call ends the wait on the upstream at
  once (cancelling the opening task, or the consumer's read in progress as
  ``asyncio.timeout`` does), which closes the upstream HTTP connection, so the upstream
  stops generating.

Foreign exceptions (httpx) are translated here, at the edge.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from tokenwire.backends._transport import UpstreamTransport, direct_body
from tokenwire.backends.base import Backend, EventSink, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.codecs import SSEDecoder, WireDecoder
from tokenwire.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    RequestError,
)
from tokenwire.events import (
    Event,
    StreamCompleted,
    TextDelta,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)
from tokenwire.requests import ChatRequest

__all__ = [
    "UpstreamBackend",
    "UpstreamCall",
    "UpstreamConfig",
    "is_content",
]

log = logging.getLogger("tokenwire.backends.upstream")

#: Events that mean the upstream has started answering; before one of them a failure is
#: invisible to the client (the gateway fails over), after it the failure is the client's.
_CONTENT = (TextDelta, ToolCallStarted, ToolCallDelta, StreamCompleted)


def is_content(event: Event) -> bool:
    return isinstance(event, _CONTENT)


@dataclass(slots=True, kw_only=True)
class UpstreamConfig:
    """One upstream server (docs/configuration.md has the reference)."""

    name: str
    #: Base URL ending in ``/v1`` (``…/v1/chat/completions`` / ``…/v1/messages`` follow).
    url: str
    kind: str = "openai"  # openai | anthropic
    #: Environment variable holding the API key (None: ``<NAME>_API_KEY`` if set).
    api_key_env: str | None = None
    #: Models this upstream serves besides its NAME and what its /v1/models lists.
    models: list[str] = field(default_factory=list)
    #: alias -> model name on this upstream.
    aliases: dict[str, str] = field(default_factory=dict)
    #: Model sent upstream when a request names the upstream itself (None: first listed).
    default_model: str | None = None
    #: Lower is tried first when several upstreams serve a model.
    priority: int = 0
    #: Extra attempts on this upstream before failing over to the next.
    retries: int = 0
    retry_backoff: float = 0.1
    connect_timeout: float = 5.0
    #: From sending the request to the first token.
    first_token_timeout: float = 60.0
    #: Between two upstream chunks once tokens flow.
    idle_timeout: float = 30.0
    #: Ask the upstream's /v1/models at all (false: serve NAME, models and aliases only).
    discover_models: bool = True
    #: Seconds between /v1/models refreshes (0: never refresh, only at start).
    refresh_models: float = 60.0
    #: A failed upstream is tried last for this many seconds.
    cooldown: float = 5.0
    max_connections: int = 256
    #: Anthropic requires max_tokens; used when the request gives none.
    max_tokens: int = 4096
    headers: dict[str, str] = field(default_factory=dict)

    def api_key(self) -> str | None:
        env = self.api_key_env or f"{self.name.upper().replace('-', '_')}_API_KEY"
        return os.environ.get(env) or None


# -- one attempt ---------------------------------------------------------------------------


class UpstreamCall:
    """One HTTP request to one upstream, in two phases.

    Opening: a task of its own sends the request and reads until the first content event,
    so the gateway can wait for it with a deadline and fail over before anything reached
    the client. Relaying: from the first content event on, the consumer (the stream's
    producer task) reads the body itself, in ``events()``: a chunk goes from the socket to
    the journal in one task, with no hand-off between tasks per chunk.

    Stop and the timeouts interrupt whichever phase waits on the upstream: they cancel the
    opening task, or the consumer's read in progress (as ``asyncio.timeout`` does: cancel,
    then ``uncancel``), which closes the HTTP connection, so the upstream stops generating.
    """

    def __init__(
        self,
        backend: UpstreamBackend,
        request: ChatRequest,
        model: str,
        cancel: CancelToken,
    ) -> None:
        self.backend = backend
        self.config = backend.config
        self.cancel = cancel
        self._loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = self._loop.create_future()
        #: Resolves at the first content event or the end of the attempt (with its error).
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._buffer: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        #: The opening task ended (``_relay``: with the body left for the consumer).
        self._opening_over = False
        #: The body ended, failed or was interrupted: nothing more will be read.
        self._finished = False
        self._cancelled = False
        self._draining = False
        self._content = False
        # Left by the opening task for the consumer: the body, its parser and decoder.
        self._relay: _Relay | None = None
        #: The consumer task while it awaits the upstream (only then is it interrupted).
        self._reader: asyncio.Task[Any] | None = None
        self._interrupting = False
        #: Relaying with a sink: each read's events go to it from the network callback.
        self._sink: EventSink | None = None
        self._push_error: BaseException | None = None
        self._started = self._loop.time()
        self._read_at = self._started
        self.ttft_ms: float | None = None
        url, body = backend.build_request(request, model)
        self._task = self._loop.create_task(self._open(url, body), name=f"upstream-{backend.name}")
        self._watch = self._loop.create_task(self._watch_cancel())
        self._timer = self._loop.call_at(
            self._started + self.config.first_token_timeout, self._check_deadline
        )

    # -- opening task --------------------------------------------------------------------

    async def _open(self, url: str, body: dict[str, Any]) -> None:
        backend = self.backend
        response: httpx.Response | None = None
        try:
            response = await self._send(url, body)
            if response.status_code in (400, 422):
                # An older server may refuse an optional field; the backend may drop it once.
                error = await _status_error(backend.name, response)
                body_again = backend.retry_body(body, error.message)
                if body_again is None:
                    raise error
                await response.aclose()
                response = await self._send(url, body_again)
            if response.status_code >= 300:
                raise await _status_error(backend.name, response)
            if not self.opened.done():
                self.opened.set_result(None)
            parser = SSEDecoder()
            decoder = backend.decoder()
            feed = parser.feed_raw
            decode = decoder.decode
            chunks = response.aiter_raw()
            async for raw in chunks:
                events: list[Event] = []
                try:
                    for name, data, _ in feed(raw):
                        events += decode(name, data)
                        if decoder.done:
                            break
                finally:
                    if events:  # a read's good messages go out before its bad one's error
                        self._push(events)
                if decoder.done:
                    break
                if self._content:
                    # The consumer reads on from here, in its own task.
                    self._relay = _Relay(response, chunks, parser, decoder)
                    response = None
                    return
            else:
                events = _flush(parser, decoder)
                if events:
                    self._push(events)
            if not decoder.done:
                events = decoder.finish()
                if events:
                    self._push(events)
            else:
                # Read the end of the body so the connection goes back to the pool.
                self._draining = True
                await _drain(chunks)
        except asyncio.CancelledError:
            pass  # Stop or a timeout: whoever cancelled set the outcome
        except BaseException as exc:
            self._error = _translate(exc, self.backend.name)
            if not isinstance(exc, Exception):
                raise
        finally:
            if response is not None:
                await response.aclose()
            self._opening_over = True
            if self._relay is None:
                self._finished = True
                self._timer.cancel()
            for future in (self.opened, self.ready):
                if future.done():
                    continue
                if self._error is not None:
                    future.set_exception(self._error)
                    future.exception()  # retrieved: the consumer may never look
                else:
                    future.set_result(None)
            self._wake()

    async def _send(self, url: str, body: dict[str, Any]) -> httpx.Response:
        backend = self.backend
        request = backend.client.build_request(
            "POST", url, content=orjson.dumps(body), headers=backend.request_headers()
        )
        return await backend.client.send(request, stream=True)

    def _push(self, events: list[Event]) -> None:
        if not self._content:
            for event in events:
                if is_content(event):
                    now = self._loop.time()
                    self._content = True
                    self.ttft_ms = round((now - self._started) * 1000, 2)
                    self.ready.set_result(None)
                    # From now on the (usually shorter) idle deadline applies.
                    self._timer.cancel()
                    self._read_at = now
                    self._timer = self._loop.call_at(
                        now + self.config.idle_timeout, self._check_deadline
                    )
                    break
        self._buffer.extend(events)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- interruptions -------------------------------------------------------------------

    def _check_deadline(self) -> None:
        if self._finished:
            return
        now = self._loop.time()
        if self._content:
            limit, what = self.config.idle_timeout, "between tokens"
            if self._reader is None and self._opening_over:
                # The consumer is not waiting on the upstream (its reader is behind):
                # time spent there is not the upstream's silence.
                self._timer = self._loop.call_at(now + limit, self._check_deadline)
                return
            deadline = self._read_at + limit
        else:
            limit, what = self.config.first_token_timeout, "before the first token"
            deadline = self._started + limit
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
            return
        self._interrupt(
            BackendTimeout(
                f"upstream {self.backend.name} sent nothing for {limit:g}s {what}",
                code="upstream_timeout",
            )
        )

    async def _watch_cancel(self) -> None:
        await self.cancel.wait()
        self._interrupt(None)

    def _interrupt(self, error: BackendError | None) -> None:
        """Stop (``error`` None) or a timeout: end the wait on the upstream at once."""
        if self._finished:
            return
        if error is None:
            self._cancelled = True
        elif self._error is None:
            self._error = error
        if not self._opening_over:
            self._task.cancel()
        elif self._reader is not None and not self._interrupting:
            self._interrupting = True
            self._reader.cancel()
        # else the consumer is elsewhere: it sees the outcome before its next read.

    # -- consumer ------------------------------------------------------------------------

    @property
    def content_started(self) -> bool:
        return self._content

    def push_to(self, sink: EventSink) -> None:
        """Once relaying (and read through ``UpstreamTransport``), hand each read's events
        to ``sink`` in the network callback (``backends.base.PushSource``)."""
        self._sink = sink

    def _pushed(self, raw: bytes) -> bool:
        """The network callback while relaying with a sink: ``raw``'s events go straight
        to it. True: all taken, the reader sleeps on. False: the reader wakes for what is
        left: events the sink refused (in ``_buffer``; pushing is over), an error, the end.
        """
        relay, sink, buffer = self._relay, self._sink, self._buffer
        if relay is None or sink is None or self._cancelled:
            return False  # ending: the reader sees why
        if self._error is not None or self._push_error is not None:
            return False  # failed: the reader raises it
        self._read_at = self._loop.time()
        decoder = relay.decoder
        try:
            for name, data, _ in relay.parser.feed_raw(raw):
                for event in decoder.decode(name, data):
                    if type(event) is Usage and event.ttft_ms is None:
                        event.ttft_ms = self.ttft_ms  # the upstream's, for metrics
                    if buffer or not sink(event):
                        buffer.append(event)  # in order, after the one refused
                if decoder.done:
                    return False
        except Exception as exc:  # a read's good messages went out before its bad one
            self._push_error = exc
            return False
        return not buffer

    def _stamped(self, event: Event) -> Event:
        """A ``Usage`` carries the upstream's TTFT (for metrics), unless it has its own."""
        if type(event) is Usage and event.ttft_ms is None:
            event.ttft_ms = self.ttft_ms
        return event

    async def events(self) -> AsyncIterator[Event]:
        """The events as they arrive; ends quietly on Stop, raises ``BackendError``s."""
        buffer = self._buffer
        while True:
            while buffer:
                event = self._stamped(buffer.popleft())
                yield event
                if event.terminal:
                    return
            if self._opening_over:
                break
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None
        relay = self._relay
        if relay is None:
            if self._error is not None and not self._cancelled:
                raise self._error
            return
        # Relaying: read the body in this task, each chunk's events handed on at once.
        loop = self._loop
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        next_chunk = relay.chunks.__anext__
        body = direct_body(relay.response)
        feed = relay.parser.feed_raw
        decoder = relay.decoder
        decode = decoder.decode
        if body is not None and self._sink is not None:
            body.push_to(self._pushed)
        try:
            while not (self._cancelled or self._error is not None):
                if buffer or self._push_error is not None or relay.decoder.done:
                    # What pushing left: the events the sink refused, an error, the end.
                    if body is not None:
                        body.push_to(None)
                    while buffer:
                        yield buffer.popleft()
                    if self._push_error is not None:
                        raise self._push_error
                    if relay.decoder.done:
                        self._finished = True
                        return  # the terminal event went out; aclose() drains the rest
                raw: bytes | None
                if body is not None:
                    # UpstreamTransport's body, read directly (no generator layers).
                    raw = body.take()
                    if raw is None:
                        self._read_at = loop.time()
                        self._reader = task
                        try:
                            await body.waiter()
                        except BaseException:
                            body.close()  # as iterating does: the upstream sees us leave
                            raise
                        finally:
                            self._reader = None
                        continue
                else:
                    self._read_at = loop.time()
                    self._reader = task
                    try:
                        raw = await next_chunk()
                    except StopAsyncIteration:
                        raw = b""
                    finally:
                        self._reader = None
                if not raw:  # the end of the body
                    relay.ended = True
                    self._finished = True
                    for event in _flush(relay.parser, decoder):
                        yield self._stamped(event)
                    if not decoder.done:
                        # Raises if the upstream stopped short (after the flushed events).
                        for event in decoder.finish():
                            yield self._stamped(event)
                    return
                for name, data, _ in feed(raw):
                    for event in decode(name, data):
                        if type(event) is Usage and event.ttft_ms is None:
                            event.ttft_ms = self.ttft_ms  # the upstream's, for metrics
                        yield event
                    if decoder.done:
                        self._finished = True
                        return  # the terminal event went out; aclose() drains the rest
        except asyncio.CancelledError:
            if not self._interrupting or task.uncancel() > cancelling:
                raise  # not ours (shutdown)
            self._interrupting = False
        except Exception as exc:
            self._finished = True
            raise _translate(exc, self.backend.name)  # noqa: B904 (chained: __context__)
        self._finished = True
        if self._error is not None and not self._cancelled:
            raise self._error

    async def aclose(self) -> None:
        """Stop reading; closes the upstream connection if the answer was not finished."""
        self._finished = True
        self._timer.cancel()
        self._watch.cancel()
        if self._draining and not self._task.done():
            # The answer is complete; let the reader finish the body in the background.
            _background(self._task)
        elif not self._task.done():
            self._task.cancel()
            # Bounded: closing a socket does not block, but never hang a producer on it.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._task}, timeout=2.0)
        relay, self._relay = self._relay, None
        if relay is not None:
            if relay.decoder.done and not relay.ended:
                # A complete answer: read the end of its body in the background, so the
                # connection goes back to the pool.
                _background(self._loop.create_task(relay.close(drain=True)))
            else:
                await relay.close(drain=False)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({self._watch}, timeout=1.0)


class _Relay:
    """A response body handed from the opening task to the consumer."""

    __slots__ = ("chunks", "decoder", "ended", "parser", "response")

    def __init__(
        self,
        response: httpx.Response,
        chunks: AsyncIterator[bytes],
        parser: SSEDecoder,
        decoder: WireDecoder,
    ) -> None:
        self.response = response
        self.chunks = chunks
        self.parser = parser
        self.decoder = decoder
        self.ended = False

    async def close(self, *, drain: bool) -> None:
        try:
            if drain:
                await _drain(self.chunks)
            else:
                # Closing the body mid-answer closes the connection: the upstream stops.
                with contextlib.suppress(Exception):
                    await self.chunks.aclose()  # type: ignore[attr-defined]
        finally:
            with contextlib.suppress(Exception):
                await self.response.aclose()


def _flush(parser: SSEDecoder, decoder: WireDecoder) -> list[Event]:
    """Events of a last message the body ended without a blank line after."""
    events: list[Event] = []
    for name, data, _ in parser.flush():
        events += decoder.decode(name, data)
    return events


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(2.0):
            async for _ in chunks:
                pass


#: Tasks finishing a complete answer's body (strong refs: the loop keeps weak ones).
_DRAINING: set[asyncio.Task[Any]] = set()


def _background(task: asyncio.Task[Any]) -> None:
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)


async def _status_error(name: str, response: httpx.Response) -> BackendError | RequestError:
    try:
        body = (await response.aread())[:2000]
    except httpx.HTTPError:
        body = b""
    detail = _error_message(body) or response.reason_phrase
    status = response.status_code
    message = f"upstream {name} answered {status}: {detail}"
    # The client's fault: another upstream would refuse it too, so no failover.
    if status in (400, 413, 422):
        return InvalidRequest(message, code="upstream_rejected")
    return BackendUnavailable(message, code=f"upstream_{status}")


def _error_message(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return body.decode("utf-8", "replace")[:500]


def _translate(exc: BaseException, name: str) -> BaseException:
    """httpx errors -> the tokenwire tree (our own errors pass through)."""
    if isinstance(exc, BackendError | RequestError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        error: BaseException = BackendTimeout(
            f"upstream {name}: {type(exc).__name__}", code="upstream_timeout"
        )
    elif isinstance(exc, httpx.ConnectError):
        error = BackendUnavailable(
            f"upstream {name} is unreachable: {exc}", code="upstream_unreachable"
        )
    elif isinstance(exc, httpx.TransportError):
        error = BackendUnavailable(
            f"upstream {name} broke the connection: {type(exc).__name__} {exc}",
            code="upstream_disconnected",
        )
    elif isinstance(exc, Exception):
        log.exception("unexpected error reading upstream %s", name)
        error = BackendProtocolError(f"upstream {name}: {type(exc).__name__}: {exc}")
    else:
        return exc
    error.__cause__ = exc
    return error


# -- the backend ---------------------------------------------------------------------------


class UpstreamBackend(Backend):
    """A model server reached over HTTP. Subclasses build bodies and decode chunks."""

    #: Path under the base URL that streams an answer (``/chat/completions``…).
    path: str = ""

    def __init__(self, config: UpstreamConfig, *, client: httpx.AsyncClient | None = None):
        self.config = config
        self.name = config.name
        self.base_url = config.url.rstrip("/")
        self._client = client
        self._owns_client = client is None
        self._discovered: list[str] = []
        self._refresh_task: asyncio.Task[None] | None = None
        self.failed_at: float = -1e18

    # -- what subclasses provide ---------------------------------------------------------

    @abc.abstractmethod
    def build_request(self, request: ChatRequest, model: str) -> tuple[str, dict[str, Any]]:
        """The URL and JSON body that stream ``request`` from ``model``."""

    @abc.abstractmethod
    def decoder(self) -> WireDecoder:
        """A fresh decoder for one response."""

    @abc.abstractmethod
    def auth_headers(self, key: str | None) -> dict[str, str]:
        """The wire's headers, with the API key ``key`` if there is one."""

    def retry_body(self, body: dict[str, Any], rejection: str) -> dict[str, Any] | None:
        """A body to retry once after the upstream refused ``body`` with 400/422 saying
        ``rejection`` (None: the refusal stands)."""
        return None

    # -- HTTP ----------------------------------------------------------------------------

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            config = self.config
            limits = httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            )
            self._client = httpx.AsyncClient(
                # read=None: the call's first-token and idle deadlines govern reads.
                timeout=httpx.Timeout(
                    connect=config.connect_timeout,
                    read=None,
                    write=config.connect_timeout,
                    pool=config.connect_timeout,
                ),
                # httpcore's pool on asyncio sockets: no anyio cost per read (_transport.py).
                transport=UpstreamTransport(limits=limits),
                trust_env=False,
            )
        return self._client

    def request_headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            # Compressed SSE would be buffered by the decompressor; ask for none.
            "accept-encoding": "identity",
            **self.config.headers,
        }
        headers.update(self.auth_headers(self.config.api_key()))
        return headers

    # -- models --------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.config.discover_models:
            return
        await self.refresh_models()
        if self.config.refresh_models > 0:
            self._refresh_task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        if self._client is not None and self._owns_client:
            await self._client.aclose()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_models)
            await self.refresh_models()

    async def refresh_models(self) -> None:
        """Ask the upstream's ``/models``; keep the last good list when it fails."""
        try:
            response = await self.client.get(
                f"{self.base_url}/models", headers=self.request_headers(), timeout=5.0
            )
            response.raise_for_status()
            data = response.json().get("data", [])
            names = [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
        except (httpx.HTTPError, ValueError, AttributeError, KeyError) as exc:
            log.warning("upstream %s: could not list models: %s", self.name, exc)
            return
        self._discovered = names

    def model_names(self) -> list[str]:
        names = [self.name, *self.config.models, *self._discovered, *self.config.aliases]
        return list(dict.fromkeys(names))

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name, owned_by=self.name) for name in self.model_names()]

    def serves(self, model: str) -> bool:
        return (
            model == self.name
            or model in self.config.aliases
            or model in self.config.models
            or model in self._discovered
        )

    async def ensure_models(self) -> None:
        """List the upstream's models now if nothing tells what its NAME means (it was
        down at start): the first request must not send the NAME as a model name."""
        config = self.config
        if config.discover_models and not (
            config.default_model or config.models or self._discovered
        ):
            await self.refresh_models()

    def upstream_model(self, model: str) -> str:
        """The model name to send upstream for a request that asked for ``model``."""
        model = self.config.aliases.get(model, model)
        if model == self.name or model == "default":
            return (
                self.config.default_model
                or next(iter(self.config.models), None)
                or next(iter(self._discovered), None)
                or model
            )
        return model

    # -- streaming -----------------------------------------------------------------------

    def open(
        self, request: ChatRequest, cancel: CancelToken, model: str | None = None
    ) -> UpstreamCall:
        """Start one attempt; read ``call.opened`` and ``call.events()``."""
        return UpstreamCall(self, request, self.upstream_model(model or request.model), cancel)

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        """One attempt, no failover (the gateway adds that across upstreams)."""
        from tokenwire.events import Progress

        call = self.open(request, cancel)
        try:
            await asyncio.shield(call.opened)
            yield Progress(stage="connecting", message=f"upstream {self.name}")
            async for event in call.events():
                yield event
        finally:
            await call.aclose()

    def mark_failed(self) -> None:
        self.failed_at = time.monotonic()

    def cooling_down(self) -> bool:
        return time.monotonic() - self.failed_at < self.config.cooldown
