"""The sans-IO core of one chat stream: everything about a stream that is not I/O.

``_StreamCore`` builds the requests, decodes and maps the events, decides whether and when to
resume, and makes the final result; ``_async.py`` (``AsyncChatStream``) and the ``_sync.py``
generated from it (``ChatStream``) only do the I/O it asks for.

Promises (kept by the core together with the I/O loop in ``_async.py``):
- a dropped connection (transport error, read timeout, or the server closing before the
  terminal event) resumes from the last event id with ``GET /v1/streams/{id}`` and a
  ``Last-Event-ID`` header, after the server's ``retry:`` delay doubled per failed attempt
  and capped at ``max_backoff``; the events the user sees have no gap and no repeat;
- once ``max_retries`` consecutive attempts failed, or the stream cannot be resumed (a
  foreign server sends no ``X-Stream-Id``), ``StreamInterrupted`` is raised with the text
  received so far;
- the HTTP response is always closed: on ``with``/``async with`` exit, when iteration ends
  for any reason outside a ``with`` block (``break``, an exception, the end), and on
  ``close()``/``aclose()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from tokenwire.client._errors import error_from_event, error_from_response
from tokenwire.client._metrics import StreamMetrics
from tokenwire.client._protocols import Mapper
from tokenwire.codecs.sse import SSEDecoder
from tokenwire.errors import (
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    StreamInterrupted,
    TokenwireError,
)
from tokenwire.events import (
    Event,
    GuardTriggered,
    JsonPartial,
    StreamCancelled,
    StreamCompleted,
    StreamFailed,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    Usage,
)

__all__ = ["ChatResult", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a dropped stream is resumed.

    The n-th consecutive attempt waits ``retry * 2**(n-1)`` seconds, capped at ``max_backoff``,
    where ``retry`` is what the server sent in ``retry:`` (else ``default_retry``). Any event
    received resets the count.
    """

    max_retries: int = 5
    max_backoff: float = 10.0
    default_retry: float = 1.0

    def delay(self, attempt: int, server_retry_ms: int | None) -> float:
        base = server_retry_ms / 1000.0 if server_retry_ms is not None else self.default_retry
        return float(min(self.max_backoff, base * 2 ** max(0, attempt - 1)))


@dataclass(slots=True)
class ChatResult:
    """The whole answer of a finished stream."""

    id: str | None
    model: str | None
    text: str
    #: stop | length | tool_calls | content_filter | cancelled
    finish_reason: str
    usage: Usage | None
    tool_calls: list[ToolCallCompleted]
    #: The last structured value from ``json.partial`` events (None without structured output).
    parsed: Any
    metrics: StreamMetrics
    cancel_reason: str | None = None
    #: The guard that stopped the answer (``finish_reason`` is then ``content_filter``).
    guard: GuardTriggered | None = None

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == "cancelled"


class Dropped(Exception):
    """The server closed the body before the terminal event."""


@dataclass(slots=True)
class _Target:
    method: str
    url: str
    headers: dict[str, str]
    json: dict[str, Any] | None = None


@dataclass
class StreamCore:
    base_url: str
    headers: dict[str, str]
    mapper: Mapper
    policy: RetryPolicy
    model: str | None = None
    #: ``(path, body)`` of the request that starts the stream; None to attach to ``stream_id``.
    start: tuple[str, dict[str, Any]] | None = None
    stream_id: str | None = None
    last_event_id: str = ""
    retry_ms: int | None = None
    #: Resume and server-side cancel are possible (the server named the stream).
    resumable: bool = False
    cancel_requested: bool = False
    attempts: int = 0
    connections: int = 0
    text_parts: list[str] = field(default_factory=list)
    tool_calls: dict[int, ToolCallCompleted] = field(default_factory=dict)
    usage: Usage | None = None
    parsed: Any = None
    guard: GuardTriggered | None = None
    terminal: Event | None = None
    metrics: StreamMetrics = field(default_factory=StreamMetrics)
    _decoder: SSEDecoder = field(default_factory=SSEDecoder)
    _last_seq: int = -1

    # -- requests ----------------------------------------------------------------------------

    def next_target(self) -> _Target:
        if self.connections == 0 and self.start is not None:
            path, body = self.start
            return _Target("POST", self.base_url + path, dict(self.headers), body)
        headers = dict(self.headers)
        if self.last_event_id:
            headers["last-event-id"] = self.last_event_id
        return _Target("GET", f"{self.base_url}/v1/streams/{self.stream_id}", headers)

    def cancel_url(self) -> str:
        return f"{self.base_url}/v1/streams/{self.stream_id}/cancel"

    def sending(self) -> None:
        if self.connections == 0:
            # TTFT counts from the moment the request goes out, as a user would.
            self.metrics.started_at = time.perf_counter()

    def connected(self, response: httpx.Response) -> None:
        if self.connections > 0:
            self.metrics.reconnects += 1
        self.connections += 1
        header_id = response.headers.get("x-stream-id")
        if header_id:
            self.stream_id = header_id
            self.mapper.stream_id = header_id
            self.resumable = True
        elif self.mapper.protocol == "native" and self.stream_id:
            self.resumable = True
        self._decoder = SSEDecoder()
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            raise BackendProtocolError(
                f"expected an event stream (text/event-stream), got {content_type or 'nothing'}"
            )

    def http_error(self, response: httpx.Response, body: bytes) -> TokenwireError:
        return error_from_response(response.status_code, body, response.headers, model=self.model)

    def check_cancel_answer(self, response: httpx.Response, *, gone_ok: bool) -> None:
        """Raise the typed error of a refused Stop; with ``gone_ok``, a stream that already
        finished and is gone (404, 410) has nothing left to stop."""
        if gone_ok and response.status_code in (404, 410):
            return
        if response.status_code >= 400:
            raise self.http_error(response, response.content)

    # -- events ------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[Event]:
        out: list[Event] = []
        for sse in self._decoder.feed(chunk):
            if sse.id:
                self.last_event_id = sse.id
            try:
                events = self.mapper.on_event(sse)
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
                raise BackendProtocolError(f"malformed stream event {sse.data[:200]!r}") from exc
            for event in events:
                if self._accept(event):
                    out.append(self._mapped_terminal(event))
        if self._decoder.retry is not None:
            self.retry_ms = self._decoder.retry
        if out:
            self.attempts = 0
        return out

    def eof(self) -> list[Event]:
        return [self._mapped_terminal(e) for e in self.mapper.on_eof() if self._accept(e)]

    def _accept(self, event: Event) -> bool:
        """Record one event; False if it is a repeat of one already delivered."""
        if self.terminal is not None:
            return False
        if self.mapper.protocol == "native" and event.seq >= 0:
            if event.seq <= self._last_seq:
                return False
            self._last_seq = event.seq
        if isinstance(event, TextDelta):
            self.text_parts.append(event.text)
            self.metrics.chunk()
        elif isinstance(event, ToolCallDelta):
            self.metrics.chunk()
        elif isinstance(event, ToolCallCompleted):
            self.tool_calls[event.index] = event
        elif isinstance(event, JsonPartial):
            self.parsed = event.value
        elif isinstance(event, Usage):
            self.usage = event
            self.metrics.server_tokens = event.completion_tokens
        elif isinstance(event, StreamStarted):
            self.stream_id = self.stream_id or event.id or None
            self.model = event.model or self.model
        elif isinstance(event, GuardTriggered):
            self.guard = event
        if event.terminal:
            self.terminal = event
            self.metrics.end()
        return True

    def cancelled_event(self) -> StreamCancelled:
        event = StreamCancelled(seq=max(self._last_seq, 0) + 1, reason="stop")
        self._accept(event)
        return event

    def _mapped_terminal(self, event: Event) -> Event:
        """A Stop we asked for ends foreign protocols with finish_reason "stop": say so."""
        if (
            self.cancel_requested
            and self.mapper.protocol != "native"
            and isinstance(event, StreamCompleted)
            and event.finish_reason == "stop"
        ):
            cancelled = StreamCancelled(seq=event.seq, reason="stop")
            self.terminal = cancelled
            return cancelled
        return event

    # -- resume ------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def interrupted(
        self, cause: BaseException | None, message: str | None = None
    ) -> StreamInterrupted:
        if message is None:
            if not self.resumable:
                why = "the server gave no stream id to resume with"
            else:
                why = f"{self.attempts} resume attempt(s) failed"
            message = f"the stream broke ({cause!r}) and {why}"
        last = int(self.last_event_id) if self.last_event_id.isdigit() else -1
        exc = StreamInterrupted(message, partial_text=self.text, last_event_id=last)
        exc.stream_id = self.stream_id  # type: ignore[attr-defined]
        self.metrics.end()
        return exc

    def next_delay(self, cause: BaseException) -> float:
        """Seconds to wait before the next resume attempt; raises once retries are spent."""
        if not self.resumable or self.stream_id is None:
            raise self.interrupted(cause) from cause
        if self.attempts >= self.policy.max_retries:
            raise self.interrupted(cause) from cause
        self.attempts += 1
        return self.policy.delay(self.attempts, self.retry_ms)

    def result(self) -> ChatResult:
        terminal = self.terminal
        if terminal is None:
            # Closed (or broken) before its end: there is no whole result to give.
            raise self.interrupted(None, "the stream was closed before its end")
        if isinstance(terminal, StreamFailed):
            exc = error_from_event(terminal.error)
            exc.partial_text = self.text  # type: ignore[attr-defined]
            raise exc
        finish = "cancelled"
        reason = None
        if isinstance(terminal, StreamCompleted):
            finish = terminal.finish_reason
        elif isinstance(terminal, StreamCancelled):
            reason = terminal.reason
        return ChatResult(
            id=self.stream_id,
            model=self.model,
            text=self.text,
            finish_reason=finish,
            usage=self.usage,
            tool_calls=[self.tool_calls[i] for i in sorted(self.tool_calls)],
            parsed=self.parsed,
            metrics=self.metrics,
            cancel_reason=reason,
            guard=self.guard,
        )


def transport_error(exc: httpx.HTTPError, url: str) -> TokenwireError:
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"{url}: timed out ({type(exc).__name__})")
    return BackendUnavailable(f"could not reach {url}: {exc}")


#: What counts as a dropped connection: resume after it.
DROPS = (httpx.TransportError, httpx.StreamError, Dropped)


class StreamView:
    """The read-only view of a stream that ``ChatStream`` and ``AsyncChatStream`` share."""

    def __init__(self, core: StreamCore) -> None:
        self._core = core
        self._entered = False
        self._closed = False

    @property
    def id(self) -> str | None:
        """The server's stream id (``X-Stream-Id``), once the stream started."""
        return self._core.stream_id

    @property
    def metrics(self) -> StreamMetrics:
        return self._core.metrics

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._core.text

    @property
    def resumable(self) -> bool:
        """The server named the stream: resume and server-side Stop are available."""
        return self._core.resumable

    @property
    def terminal(self) -> Event | None:
        return self._core.terminal
