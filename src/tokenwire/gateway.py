"""The gateway: upstream servers from ``--upstream`` and the TOML config, routing by model
name, and failover.

``Gateway`` is one ``Backend`` in the router beside the embedded model. It serves every
upstream's NAME, the models each lists at ``/v1/models`` (refreshed), the configured models
and aliases. For a request it tries the upstreams that serve the model in order (priority,
then config order; one that failed in the last ``cooldown`` seconds goes last), each with
its retries, and promises:

- a failure before the first token (refused connection, 5xx, connect or first-token timeout,
  a body that dies before any token) fails over to the next upstream, invisibly: the client
  sees one answer;
- when every upstream fails fast, the request is refused before any event (503 / 504);
  an upstream's 4xx for a bad request is the client's error (no failover, a 4xx);
- after the first token a failure is raised as a typed ``BackendError`` (the stream manager
  journals ``stream.failed`` after the partial output);
- Stop closes the upstream request at once (``UpstreamCall``).

The embedded model stays the default unless ``--no-embedded``; then ``default`` goes to the
``[gateway] default`` upstream, or the first by priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import fields
from typing import Any

from tokenwire.backends._upstream import UpstreamBackend, UpstreamCall, UpstreamConfig
from tokenwire.backends.anthropic import AnthropicBackend
from tokenwire.backends.base import Backend, EventSink, ModelInfo
from tokenwire.backends.openai import OpenAIBackend
from tokenwire.cancel import CancelToken
from tokenwire.config import Settings
from tokenwire.errors import (
    BackendError,
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
)
from tokenwire.events import Event, Progress, Usage
from tokenwire.requests import ChatRequest
from tokenwire.router import DEFAULT_MODEL, Router

__all__ = ["Gateway", "UpstreamConfig", "build_router", "upstream_configs"]

log = logging.getLogger("tokenwire.gateway")

BACKENDS: dict[str, type[UpstreamBackend]] = {
    "openai": OpenAIBackend,
    "anthropic": AnthropicBackend,
}

#: How long a request may wait for an upstream's answer headers before the stream starts
#: anyway (with a ``progress: connecting`` event). Within it, an upstream 4xx is a clean 4xx
#: and "every upstream is down" a clean 503, before any header goes out.
ACCEPT_WAIT = 1.0

_CONFIG_FIELDS = {f.name for f in fields(UpstreamConfig)}


def _parse_upstream_flag(flag: str) -> UpstreamConfig:
    """``NAME=URL`` or ``NAME=KIND+URL`` (``claude=anthropic+https://…/v1``)."""
    name, sep, url = flag.partition("=")
    name, url = name.strip(), url.strip()
    if not sep or not name or not url:
        raise InvalidRequest(f"--upstream wants NAME=URL, not {flag!r}", param="upstream")
    kind = "openai"
    for candidate in BACKENDS:
        if url.startswith(candidate + "+"):
            kind, url = candidate, url[len(candidate) + 1 :]
    return UpstreamConfig(name=name, url=url, kind=kind)


def upstream_configs(settings: Settings) -> tuple[list[UpstreamConfig], dict[str, Any]]:
    """Upstreams from the TOML ``[upstreams.NAME]`` tables and the ``--upstream`` flags (a
    flag naming a configured upstream replaces its URL), and the ``[gateway]`` table."""
    extra = settings.extra
    defaults = dict(extra.get("gateway") or {})
    upstream_defaults = {k: v for k, v in defaults.items() if k in _CONFIG_FIELDS}
    configs: dict[str, UpstreamConfig] = {}
    tables = extra.get("upstreams") or {}
    if isinstance(tables, list):  # [[upstreams]] arrays with name = "…"
        tables = {str(t.get("name")): t for t in tables if isinstance(t, dict)}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise InvalidRequest(f"[upstreams.{name}] must be a table", param="config")
        values = {**upstream_defaults, **{k.replace("-", "_"): v for k, v in table.items()}}
        values["name"] = name
        unknown = set(values) - _CONFIG_FIELDS
        if unknown:
            raise InvalidRequest(
                f"[upstreams.{name}]: unknown keys {sorted(unknown)}", param="config"
            )
        if "url" not in values:
            raise InvalidRequest(f"[upstreams.{name}] needs url", param="config")
        configs[name] = UpstreamConfig(**values)
    for flag in settings.upstream:
        parsed = _parse_upstream_flag(flag)
        if parsed.name in configs:
            configs[parsed.name].url = parsed.url
        else:
            values = {**upstream_defaults, "name": parsed.name, "url": parsed.url}
            values["kind"] = parsed.kind
            configs[parsed.name] = UpstreamConfig(**values)
    for config in configs.values():
        if config.kind not in BACKENDS:
            raise InvalidRequest(
                f"upstream {config.name}: kind must be one of {sorted(BACKENDS)}", param="config"
            )
    return list(configs.values()), defaults


class Gateway(Backend):
    name = "gateway"

    def __init__(
        self,
        upstreams: list[UpstreamBackend],
        *,
        aliases: dict[str, str] | None = None,
        default: str | None = None,
        accept_wait: float = ACCEPT_WAIT,
    ) -> None:
        self.upstreams = upstreams
        self.aliases = dict(aliases or {})
        self.default = default
        self.accept_wait = accept_wait

    @classmethod
    def from_settings(cls, settings: Settings) -> Gateway | None:
        configs, defaults = upstream_configs(settings)
        if not configs:
            return None
        upstreams = [BACKENDS[c.kind](c) for c in configs]
        aliases = {str(k): str(v) for k, v in (settings.extra.get("aliases") or {}).items()}
        return cls(
            upstreams,
            aliases=aliases,
            default=defaults.get("default"),
            accept_wait=float(defaults.get("accept_wait", ACCEPT_WAIT)),
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(u.start() for u in self.upstreams))

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self.upstreams), return_exceptions=True)

    # -- routing ---------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {}
        for upstream in self.upstreams:
            for info in upstream.models():
                seen.setdefault(info.id, info)
        for alias in self.aliases:
            seen.setdefault(alias, ModelInfo(alias, owned_by="gateway"))
        return list(seen.values())

    def plan(self, model: str) -> list[tuple[UpstreamBackend, str]]:
        """The upstreams to try for ``model``, in order, with the name each is asked for."""
        model = self.aliases.get(model, model)
        if model == DEFAULT_MODEL:
            model = self.default or self._by_priority(self.upstreams)[0].name
            model = self.aliases.get(model, model)
        serving = [u for u in self.upstreams if u.serves(model)]
        if not serving:
            raise ModelNotFound(model)
        # Each upstream maps the name (its NAME, its aliases) when the attempt opens.
        return [(u, model) for u in self._by_priority(serving)]

    def _by_priority(self, upstreams: list[UpstreamBackend]) -> list[UpstreamBackend]:
        order = {id(u): i for i, u in enumerate(self.upstreams)}
        return sorted(upstreams, key=lambda u: (u.cooling_down(), u.config.priority, order[id(u)]))

    # -- streaming -------------------------------------------------------------------------

    def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        relay = _Relayed()
        relay.attempts = self._attempts(request, cancel, relay)
        return relay

    async def _attempts(
        self, request: ChatRequest, cancel: CancelToken, relay: _Relayed
    ) -> AsyncIterator[Event]:
        plan = self.plan(request.model)
        loop = asyncio.get_running_loop()
        accept_by = loop.time() + self.accept_wait
        announced = False
        failures: list[BackendError] = []
        for upstream, model in plan:
            for attempt in range(upstream.config.retries + 1):
                if cancel.is_cancelled():
                    return
                if attempt:
                    await asyncio.sleep(upstream.config.retry_backoff * attempt)
                await upstream.ensure_models()
                call = relay.call = upstream.open(request, cancel, model)
                if relay.sink is not None:
                    call.push_to(relay.sink)  # it pushes once relaying, past failover
                try:
                    if not announced:
                        # Wait briefly for the first token: an upstream 4xx, or every
                        # upstream failing fast, is then still a clean error response
                        # instead of a started stream. A slower upstream starts the stream
                        # with a progress event, so headers and heartbeats go out.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(max(accept_by - loop.time(), 0.0)):
                                await asyncio.shield(call.ready)
                        if cancel.is_cancelled():
                            return
                        announced = True
                        if not call.ready.done():
                            yield Progress(stage="connecting", message=f"upstream {upstream.name}")
                    events = call.events()
                    async for event in events:
                        if isinstance(event, Usage) and event.ttft_ms is None:
                            event.ttft_ms = call.ttft_ms
                        if call.content_started:
                            # No failover from here on: the reader takes the call's own
                            # events (this generator waits at this yield until closed).
                            relay.events = events
                        yield event
                    return
                except BackendError as exc:
                    if call.content_started:
                        raise
                    upstream.mark_failed()
                    failures.append(exc)
                    log.warning(
                        "upstream %s failed before the first token (%s); failing over",
                        upstream.name,
                        exc.message,
                    )
                finally:
                    await call.aclose()
        if cancel.is_cancelled():
            return
        if not failures:
            raise BackendUnavailable("no upstream answered", code="upstream_unreachable")
        if len(failures) == 1:
            raise failures[0]
        last = failures[-1]
        messages = "; ".join(f.message for f in failures)
        raise type(last)(
            f"every upstream failed before the first token: {messages}", code=last.code
        )


class _Relayed(AsyncIterator[Event]):
    """``Gateway.stream``'s events: the failover attempts until the first token, then the
    upstream call's own events, taken directly: no generator of the gateway's resumed per
    chunk. Closing it closes both (the attempts' ``finally`` closes the upstream call).
    A sink given to ``push_to`` goes to each upstream call (``backends.base.PushSource``)."""

    __slots__ = ("attempts", "call", "events", "sink")

    def __init__(self) -> None:
        self.attempts: AsyncIterator[Event] | None = None
        self.events: AsyncIterator[Event] | None = None
        self.call: UpstreamCall | None = None
        self.sink: EventSink | None = None

    def push_to(self, sink: EventSink) -> None:
        # The manager offers it after the stream's first event, before the call relays.
        self.sink = sink
        if self.call is not None:
            self.call.push_to(sink)

    def __anext__(self) -> Awaitable[Event]:
        events = self.events
        if events is not None:
            return events.__anext__()
        if self.attempts is None:
            return _closed()  # as an async generator after aclose()
        return self.attempts.__anext__()

    async def aclose(self) -> None:
        events, self.events = self.events, None
        attempts, self.attempts = self.attempts, None
        try:
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]
        finally:
            if attempts is not None:
                await attempts.aclose()  # type: ignore[attr-defined]


async def _closed() -> Event:
    raise StopAsyncIteration


def build_router(settings: Settings, embedded: Backend | None) -> Router:
    """The embedded model (unless ``no_embedded``) and the gateway, if upstreams exist."""
    gateway = Gateway.from_settings(settings)
    if embedded is None and gateway is None:
        raise InvalidRequest("--no-embedded needs at least one --upstream", param="upstream")
    if embedded is None:
        assert gateway is not None
        router = Router(gateway)
    else:
        router = Router(embedded, [gateway] if gateway is not None else [])
    for alias, target in (settings.extra.get("aliases") or {}).items():
        router.alias(str(alias), str(target))
    return router
