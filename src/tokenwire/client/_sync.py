"""The sync client: ``Client``, ``Chat``, ``Streams`` and ``ChatStream``.

GENERATED from ``_async.py`` by ``scripts/unasync.py``: do not edit; edit ``_async.py`` and
run ``make unasync``. ``make lint`` fails when this file is stale.

    client = tokenwire.Client("http://127.0.0.1:8000")
    with client.chat.stream(messages=[{"role": "user", "content": "Hi"}]) as s:
        for piece in s.text_stream():
            print(piece, end="", flush=True)
    print(s.final().finish_reason, s.metrics.summary())
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx

from tokenwire.client._client import ClientConfig, model_names, timeout_for
from tokenwire.client._protocols import ProtocolName
from tokenwire.client._stream import (
    DROPS,
    ChatResult,
    Dropped,
    StreamCore,
    StreamView,
    transport_error,
)
from tokenwire.errors import StreamExpired, StreamNotFound, TokenwireError
from tokenwire.events import Event, JsonPartial, StreamFailed, TextDelta

__all__ = ["Chat", "ChatStream", "Client", "Streams"]


class _Closing:
    """``with`` releases it: ``__exit__`` calls ``close``."""

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Client(ClientConfig, _Closing):
    """A tokenwire client (synchronous). Close it (or use ``with``) to release its
    connections."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        protocol: ProtocolName = "native",
        timeout: float = 60.0,
        max_retries: int = 5,
        max_backoff: float = 10.0,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 100,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            protocol=protocol,
            max_retries=max_retries,
            max_backoff=max_backoff,
            headers=headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(
            timeout=timeout_for(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self.chat = Chat(self)
        self.streams = Streams(self)

    def models(self) -> list[str]:
        """The model names the server lists (``GET /v1/models``)."""
        url = f"{self.base_url}/v1/models"
        try:
            response = self._http.get(url, headers=self.headers_for(self.protocol))
        except httpx.HTTPError as exc:
            raise transport_error(exc, url) from exc
        return model_names(response)

    def close(self) -> None:
        """Release the connections (only those of an ``http_client`` this client made)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self


class Chat:
    """``client.chat``: start chat streams."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def stream(
        self,
        *,
        messages: Iterable[Any],
        model: str = "default",
        protocol: ProtocolName | None = None,
        **params: Any,
    ) -> ChatStream:
        """Start a chat stream. ``params`` are the protocol's request fields
        (``max_tokens``, ``temperature``, ``seed``, ``stop``, ``response_format``, ``tools`` …).
        The request is sent on ``with`` entry or first iteration."""
        core = self._client.start_core(model, messages, protocol, params)
        return ChatStream(self._client._http, core)

    def create(
        self,
        *,
        messages: Iterable[Any],
        model: str = "default",
        protocol: ProtocolName | None = None,
        **params: Any,
    ) -> ChatResult:
        """Stream and return the whole result (with its metrics)."""
        with self.stream(messages=messages, model=model, protocol=protocol, **params) as stream:
            return stream.final()


class Streams:
    """``client.streams``: attach to or stop any stream by its id."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def resume(
        self, stream_id: str, *, after: int = -1, protocol: ProtocolName = "native"
    ) -> ChatStream:
        """Attach to a stream by id: replay the events after ``after``, then follow live."""
        return ChatStream(self._client._http, self._client.resume_core(stream_id, after, protocol))

    def cancel(self, stream_id: str) -> None:
        """Stop a stream by id (idempotent)."""
        core = self._client.resume_core(stream_id, -1, "native")
        _post_cancel(self._client._http, core, gone_ok=False)


def _post_cancel(http: httpx.Client, core: StreamCore, *, gone_ok: bool) -> None:
    url = core.cancel_url()
    try:
        response = http.post(url, headers=core.headers)
    except httpx.HTTPError as exc:
        raise transport_error(exc, url) from exc
    core.check_cancel_answer(response, gone_ok=gone_ok)


class ChatStream(StreamView, _Closing):
    """A streaming chat response (synchronous). Use as
    ``with client.chat.stream(...) as stream:``."""

    def __init__(self, http: httpx.Client, core: StreamCore) -> None:
        super().__init__(core)
        self._http = http
        self._response: httpx.Response | None = None
        self._source: Generator[Event, None, None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ChatStream:
        self._entered = True
        self._open()
        return self

    def close(self) -> None:
        """Release the connection. Idempotent; the server keeps the stream for resume."""
        self._closed = True
        if self._source is not None:
            self._source.close()
        self._close_response()

    def _close_response(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()

    def _connect(self) -> httpx.Response:
        core = self._core
        target = core.next_target()
        request = self._http.build_request(
            target.method, target.url, headers=target.headers, json=target.json
        )
        core.sending()
        try:
            response = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            if core.connections == 0:
                raise transport_error(exc, target.url) from exc
            raise
        if response.status_code != 200:
            try:
                body = response.read()
            except httpx.HTTPError:
                body = b""
            finally:
                response.close()
            raise core.http_error(response, body)
        try:
            core.connected(response)
        except BaseException:
            response.close()
            raise
        return response

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("this stream is closed")
        if self._response is None and self._core.connections == 0:
            self._response = self._connect()

    def _reconnect(self, cause: BaseException) -> None:
        core = self._core
        while True:
            time.sleep(core.next_delay(cause))
            try:
                self._response = self._connect()
                return
            except (StreamNotFound, StreamExpired) as exc:
                raise core.interrupted(exc) from exc
            except (httpx.HTTPError, TokenwireError) as exc:
                cause = exc

    # -- events ------------------------------------------------------------------------------

    def _events(self) -> Generator[Event, None, None]:
        core = self._core
        try:
            self._open()
            while core.terminal is None:
                try:
                    assert self._response is not None
                    for chunk in self._response.iter_bytes():
                        for event in core.feed(chunk):
                            yield event
                            if event.terminal:
                                return
                    for event in core.eof():
                        yield event
                        if event.terminal:
                            return
                    raise Dropped("the server closed the stream before its end")
                except DROPS as exc:
                    self._close_response()
                    if core.cancel_requested and not core.resumable:
                        yield core.cancelled_event()
                        return
                    if self._closed:
                        return
                    self._reconnect(exc)
        finally:
            self._close_response()

    def __iter__(self) -> Iterator[Event]:
        if self._source is None:
            self._source = self._events()
        try:
            # Not ``yield from``-like delegation: a ``break`` out of this loop must not
            # close ``_source``, so that reading can go on inside a ``with`` block.
            for event in self._source:
                yield event
        finally:
            if not self._entered:
                self.close()

    def text_stream(self) -> Iterator[str]:
        """The text pieces as they arrive. Raises the typed error if the stream failed."""
        for event in self:
            if isinstance(event, TextDelta):
                yield event.text
            elif isinstance(event, StreamFailed):
                self._core.result()

    def partial_objects(self) -> Iterator[Any]:
        """Each progressively validated value of a structured output (``json.partial``)."""
        for event in self:
            if isinstance(event, JsonPartial):
                yield event.value
            elif isinstance(event, StreamFailed):
                self._core.result()

    def final(self) -> ChatResult:
        """Read to the end and return the whole result (raises if the stream failed)."""
        for _ in self:
            pass
        return self._core.result()

    def cancel(self) -> None:
        """Stop generation on the server (``POST /v1/streams/{id}/cancel``).

        Keep reading afterwards: the stream ends with ``stream.cancelled``. On a server that
        named no stream, closing the connection is the only Stop there is, so that is done.
        The sync ``ChatStream.cancel`` is safe to call from another thread (a signal
        handler's helper thread).
        """
        core = self._core
        core.cancel_requested = True
        if core.resumable and core.stream_id:
            _post_cancel(self._http, core, gone_ok=True)
            return
        self._close_response()
