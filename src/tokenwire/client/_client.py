"""What ``Client`` and ``AsyncClient`` share: base URL, credentials, protocol and retry policy.

``ClientConfig`` holds the settings and builds the sans-IO core of each stream; the I/O
classes are written once in ``_async.py`` (``AsyncClient``) and generated into ``_sync.py``
(``Client``).

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
from tokenwire.client._stream import RetryPolicy, StreamCore
from tokenwire.errors import BackendProtocolError

__all__ = ["DEFAULT_BASE_URL", "ClientConfig", "model_names", "timeout_for"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def _normalize(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


class ClientConfig:
    """The settings of a client, and the stream cores built from them."""

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

    def headers_for(self, protocol: ProtocolName) -> dict[str, str]:
        return {**auth_headers(protocol, self.api_key), **self.headers}

    def start_core(
        self,
        model: str,
        messages: Iterable[Any],
        protocol: ProtocolName | None,
        params: dict[str, Any],
    ) -> StreamCore:
        protocol = protocol or self.protocol
        path, body = build_request(protocol, model, to_wire_messages(messages), params)
        return StreamCore(
            base_url=self.base_url,
            headers=self.headers_for(protocol),
            mapper=mapper_for(protocol),
            policy=self.retry_policy,
            model=model,
            start=(path, body),
        )

    def resume_core(self, stream_id: str, after: int, protocol: ProtocolName) -> StreamCore:
        core = StreamCore(
            base_url=self.base_url,
            headers=self.headers_for(protocol),
            mapper=mapper_for(protocol),
            policy=self.retry_policy,
            stream_id=stream_id,
            last_event_id=str(after) if after >= 0 else "",
            resumable=True,
        )
        core.mapper.stream_id = stream_id
        return core


def model_names(response: httpx.Response) -> list[str]:
    if response.status_code != 200:
        raise error_from_response(response.status_code, response.content, response.headers)
    try:
        return [str(model["id"]) for model in response.json()["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendProtocolError(f"unexpected /v1/models answer: {response.text[:200]}") from exc


def timeout_for(timeout: float) -> httpx.Timeout:
    # The read timeout is the idle limit between bytes; heartbeats keep a live stream under it.
    return httpx.Timeout(timeout, connect=min(timeout, 10.0))
