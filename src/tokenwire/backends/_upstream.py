"""What every upstream backend shares: how to reach the server (``Endpoint``), the pooled
httpx client, the request headers, and opening one attempt (``UpstreamCall``, ``_call.py``).

An upstream backend (``openai.py``, ``anthropic.py``) only says, through its wire's codec,
how to build the request body and which decoder reads the answer. Which upstream serves
which model, aliases, retries, failover and cooldown are the gateway's (``gateway.py``).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenwire.backends._call import UpstreamCall
from tokenwire.backends._transport import UpstreamTransport
from tokenwire.backends.base import Backend
from tokenwire.cancel import CancelToken
from tokenwire.codecs import WireDecoder
from tokenwire.events import Event, Progress
from tokenwire.requests import ChatRequest

__all__ = ["Endpoint", "UpstreamBackend", "UpstreamCall"]

log = logging.getLogger("tokenwire.backends.upstream")


@dataclass(slots=True, kw_only=True)
class Endpoint:
    """How to reach one upstream server and how long to wait on it (the connection half of
    an ``[upstreams.NAME]`` table; docs/configuration.md has the reference)."""

    name: str
    #: Base URL ending in ``/v1`` (``…/v1/chat/completions`` / ``…/v1/messages`` follow).
    url: str
    #: Environment variable holding the API key (None: ``<NAME>_API_KEY`` if set).
    api_key_env: str | None = None
    connect_timeout: float = 5.0
    #: From sending the request to the first token.
    first_token_timeout: float = 60.0
    #: Between two upstream chunks once tokens flow.
    idle_timeout: float = 30.0
    max_connections: int = 256
    #: Anthropic requires max_tokens; used when the request gives none.
    max_tokens: int = 4096
    #: How an OpenAI-compatible upstream continues a partial answer when another replica
    #: takes a stream over: ``continue_final_message`` (vLLM's extension, also tokenwire's),
    #: ``assistant`` (a final assistant message is continued as is: llama.cpp's server), or
    #: ``none`` (the stream ends ``producer_lost``). Anthropic upstreams always can.
    prefill: str = "none"
    headers: dict[str, str] = field(default_factory=dict)

    def api_key(self) -> str | None:
        env = self.api_key_env or f"{self.name.upper().replace('-', '_')}_API_KEY"
        return os.environ.get(env) or None


class UpstreamBackend(Backend):
    """A model server reached over HTTP. Subclasses name their wire's body and decoder."""

    #: Path under the base URL that streams an answer (``/chat/completions``…).
    path: str = ""

    def __init__(self, config: Endpoint, *, client: httpx.AsyncClient | None = None):
        self.config = config
        self.name = config.name
        self.base_url = config.url.rstrip("/")
        self._client = client
        self._owns_client = client is None
        self._transport: UpstreamTransport | None = None
        self._urls: dict[str, httpx.URL] = {}
        connect = config.connect_timeout
        # read None: the call's first-token and idle deadlines govern reads.
        self._timeouts = {"connect": connect, "read": None, "write": connect, "pool": connect}

    # -- what subclasses provide -----------------------------------------------------------

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

    # -- HTTP ------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            config = self.config
            limits = httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            )
            # httpcore's pool on asyncio sockets: no anyio cost per read (_transport.py).
            self._transport = UpstreamTransport(limits=limits)
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(**self._timeouts),
                transport=self._transport,
                trust_env=False,
            )
        return self._client

    async def send(self, url: str, content: bytes) -> httpx.Response:
        """POST ``content`` to ``url``; the response streams. Straight to the pooled
        transport: httpx's client would add auth, redirect, cookie and hook steps (tens of
        µs before each first token) that a relay's POST never needs."""
        client = self.client
        headers = self.request_headers()
        transport = self._transport
        if transport is None:  # a client given from outside: its own stack
            request = client.build_request("POST", url, content=content, headers=headers)
            return await client.send(request, stream=True)
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = httpx.URL(url)
        request = httpx.Request(
            "POST", target, content=content, headers=headers, extensions={"timeout": self._timeouts}
        )
        return await transport.handle_async_request(request)

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

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()

    async def list_models(self) -> list[str] | None:
        """The model names the upstream's ``/models`` lists (None: it could not say)."""
        try:
            response = await self.client.get(
                f"{self.base_url}/models", headers=self.request_headers(), timeout=5.0
            )
            response.raise_for_status()
            data = response.json().get("data", [])
            return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
        except (httpx.HTTPError, ValueError, AttributeError, KeyError) as exc:
            log.warning("upstream %s: could not list models: %s", self.name, exc)
            return None

    # -- streaming -------------------------------------------------------------------------

    def open(self, request: ChatRequest, cancel: CancelToken, model: str) -> UpstreamCall:
        """Start one attempt asking for ``model`` (the name the upstream knows); read
        ``call.opened``, ``call.ready`` and ``call.events()``."""
        url, body = self.build_request(request, model)
        return UpstreamCall(self, url, body, cancel)

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        """One attempt, no failover (the gateway adds that across upstreams)."""
        call = self.open(request, cancel, request.model)
        try:
            await asyncio.shield(call.opened)
            yield Progress(stage="connecting", message=f"upstream {self.name}")
            async for event in call.events():
                yield event
        finally:
            await call.aclose()
