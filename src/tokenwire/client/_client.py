"""``Client`` and ``AsyncClient``: the same shape, sync and async (httpx style).

    client = tokenwire.Client("http://127.0.0.1:8000")
    with client.chat.stream(model="default", messages=[{"role": "user", "content": "Hi"}]) as s:
        for piece in s.text_stream():
            print(piece, end="", flush=True)
    print(s.final().finish_reason, s.metrics.summary())

``base_url`` is the server's root; a trailing ``/v1`` is accepted and dropped, so an
OpenAI-style base URL works too. ``protocol`` picks the wire protocol (``native`` for
tokenwire, ``openai`` or ``anthropic`` for other servers); it can be changed per call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import httpx

from tokenwire.client._errors import error_from_response
from tokenwire.client._protocols import (
    ProtocolName,
    auth_headers,
    build_request,
    mapper_for,
    to_wire_messages,
)
from tokenwire.client._stream import (
    AsyncChatStream,
    ChatResult,
    ChatStream,
    RetryPolicy,
    _StreamCore,
    _transport_error,
)
from tokenwire.errors import BackendProtocolError

__all__ = ["DEFAULT_BASE_URL", "AsyncClient", "Client"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def _normalize(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


class _ClientBase:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        *,
        protocol: ProtocolName,
        max_retries: int,
        max_backoff: float,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.base_url = _normalize(
            base_url or os.environ.get("TOKENWIRE_BASE_URL") or DEFAULT_BASE_URL
        )
        self.api_key = api_key if api_key is not None else os.environ.get("TOKENWIRE_API_KEY")
        self.protocol: ProtocolName = protocol
        self.retry_policy = RetryPolicy(max_retries=max_retries, max_backoff=max_backoff)
        self.headers = dict(headers or {})
        mapper_for(protocol)  # fail fast on an unknown protocol

    def _headers(self, protocol: ProtocolName) -> dict[str, str]:
        return {**auth_headers(protocol, self.api_key), **self.headers}

    def _start_core(
        self,
        model: str,
        messages: Iterable[Any],
        protocol: ProtocolName | None,
        params: dict[str, Any],
    ) -> _StreamCore:
        protocol = protocol or self.protocol
        path, body = build_request(protocol, model, to_wire_messages(messages), params)
        return _StreamCore(
            base_url=self.base_url,
            headers=self._headers(protocol),
            mapper=mapper_for(protocol),
            policy=self.retry_policy,
            model=model,
            start=(path, body),
        )

    def _resume_core(self, stream_id: str, after: int, protocol: ProtocolName) -> _StreamCore:
        core = _StreamCore(
            base_url=self.base_url,
            headers=self._headers(protocol),
            mapper=mapper_for(protocol),
            policy=self.retry_policy,
            stream_id=stream_id,
            last_event_id=str(after) if after >= 0 else "",
            resumable=True,
        )
        core.mapper.stream_id = stream_id
        return core


def _model_names(response: httpx.Response) -> list[str]:
    if response.status_code != 200:
        raise error_from_response(response.status_code, response.content, response.headers)
    try:
        return [str(model["id"]) for model in response.json()["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendProtocolError(f"unexpected /v1/models answer: {response.text[:200]}") from exc


def _timeout(timeout: float) -> httpx.Timeout:
    # The read timeout is the idle limit between bytes; heartbeats keep a live stream under it.
    return httpx.Timeout(timeout, connect=min(timeout, 10.0))


class Client(_ClientBase):
    """A synchronous tokenwire client. Close it (or use ``with``) to release its connections."""

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
        self._http = http_client or httpx.Client(timeout=_timeout(timeout))
        self.chat = Chat(self)
        self.streams = Streams(self)

    def models(self) -> list[str]:
        """The model names the server lists (``GET /v1/models``)."""
        url = f"{self.base_url}/v1/models"
        try:
            response = self._http.get(url, headers=self._headers(self.protocol))
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        return _model_names(response)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Chat:
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
        core = self._client._start_core(model, messages, protocol, params)
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
    def __init__(self, client: Client) -> None:
        self._client = client

    def resume(
        self, stream_id: str, *, after: int = -1, protocol: ProtocolName = "native"
    ) -> ChatStream:
        """Attach to a stream by id: replay the events after ``after``, then follow live."""
        return ChatStream(self._client._http, self._client._resume_core(stream_id, after, protocol))

    def cancel(self, stream_id: str) -> None:
        """Stop a stream by id (idempotent)."""
        core = self._client._resume_core(stream_id, -1, "native")
        url = core.cancel_url()
        try:
            response = self._client._http.post(url, headers=core.headers)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        if response.status_code >= 400:
            raise core.http_error(response, response.content)


class AsyncClient(_ClientBase):
    """The asynchronous twin of :class:`Client`."""

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
        http_client: httpx.AsyncClient | None = None,
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
        self._http = http_client or httpx.AsyncClient(
            timeout=_timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self.chat = AsyncChat(self)
        self.streams = AsyncStreams(self)

    async def models(self) -> list[str]:
        """The model names the server lists (``GET /v1/models``)."""
        url = f"{self.base_url}/v1/models"
        try:
            response = await self._http.get(url, headers=self._headers(self.protocol))
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        return _model_names(response)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncChat:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def stream(
        self,
        *,
        messages: Iterable[Any],
        model: str = "default",
        protocol: ProtocolName | None = None,
        **params: Any,
    ) -> AsyncChatStream:
        """Start a chat stream; see :meth:`Chat.stream`."""
        core = self._client._start_core(model, messages, protocol, params)
        return AsyncChatStream(self._client._http, core)

    async def create(
        self,
        *,
        messages: Iterable[Any],
        model: str = "default",
        protocol: ProtocolName | None = None,
        **params: Any,
    ) -> ChatResult:
        async with self.stream(
            messages=messages, model=model, protocol=protocol, **params
        ) as stream:
            return await stream.final()


class AsyncStreams:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def resume(
        self, stream_id: str, *, after: int = -1, protocol: ProtocolName = "native"
    ) -> AsyncChatStream:
        return AsyncChatStream(
            self._client._http, self._client._resume_core(stream_id, after, protocol)
        )

    async def cancel(self, stream_id: str) -> None:
        core = self._client._resume_core(stream_id, -1, "native")
        url = core.cancel_url()
        try:
            response = await self._client._http.post(url, headers=core.headers)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        if response.status_code >= 400:
            raise core.http_error(response, response.content)
