"""The gateway: upstream servers from ``--upstream`` and the TOML config, which of them
serves which model name, and failover.

Everything about routing to upstreams lives here: their configuration
(``UpstreamConfig``: an ``Endpoint`` to reach, plus how to route to it), the names each
serves (its NAME, configured models, aliases, what its ``/v1/models`` lists, refreshed),
aliases (the ``[aliases]`` table, then each upstream's, resolved in ``Gateway.plan`` only),
retries and cooldown. The backends under it only open one call to one upstream.

``Gateway`` is one ``Backend`` in the router beside the embedded model. For a request it
tries the upstreams that serve the model in order (priority, then config order; one that
failed in the last ``cooldown`` seconds goes last), each with its retries, and promises:

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
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field, fields
from typing import Any

from tokenwire.backends._upstream import Endpoint, UpstreamBackend, UpstreamCall
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
from tokenwire.events import Event, Progress
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


@dataclass(slots=True, kw_only=True)
class UpstreamConfig(Endpoint):
    """One ``[upstreams.NAME]`` table: how to reach it (``Endpoint``), and how the gateway
    routes to it (docs/configuration.md has the reference)."""

    kind: str = "openai"  # openai | anthropic
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
    #: Ask the upstream's /v1/models at all (false: serve NAME, models and aliases only).
    discover_models: bool = True
    #: Seconds between /v1/models refreshes (0: never refresh, only at start).
    refresh_models: float = 60.0
    #: A failed upstream is tried last for this many seconds.
    cooldown: float = 5.0


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


def _table_config(name: str, table: Any, defaults: dict[str, Any]) -> UpstreamConfig:
    if not isinstance(table, dict):
        raise InvalidRequest(f"[upstreams.{name}] must be a table", param="config")
    values = {**defaults, **{k.replace("-", "_"): v for k, v in table.items()}}
    values["name"] = name
    unknown = set(values) - _CONFIG_FIELDS
    if unknown:
        raise InvalidRequest(f"[upstreams.{name}]: unknown keys {sorted(unknown)}", param="config")
    if "url" not in values:
        raise InvalidRequest(f"[upstreams.{name}] needs url", param="config")
    if values.get("prefill", "none") not in ("none", "continue_final_message", "assistant"):
        raise InvalidRequest(
            f"[upstreams.{name}] prefill: none, continue_final_message or assistant",
            param="config",
        )
    return UpstreamConfig(**values)


def upstream_configs(settings: Settings) -> tuple[list[UpstreamConfig], dict[str, Any]]:
    """Upstreams from the TOML ``[upstreams.NAME]`` tables and the ``--upstream`` flags (a
    flag naming a configured upstream replaces its URL), and the ``[gateway]`` table."""
    extra = settings.extra
    defaults = dict(extra.get("gateway") or {})
    upstream_defaults = {k: v for k, v in defaults.items() if k in _CONFIG_FIELDS}
    tables = extra.get("upstreams") or {}
    if isinstance(tables, list):  # [[upstreams]] arrays with name = "…"
        tables = {str(t.get("name")): t for t in tables if isinstance(t, dict)}
    configs = {
        name: _table_config(name, table, upstream_defaults) for name, table in tables.items()
    }
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


class Upstream:
    """One upstream as the gateway routes to it: the names it serves (configured, aliased,
    listed by its ``/v1/models``), the name each is sent as, and its cooldown."""

    def __init__(self, config: UpstreamConfig, backend: UpstreamBackend) -> None:
        self.config = config
        self.backend = backend
        self.name = config.name
        self._discovered: list[str] = []
        self._refresh_task: asyncio.Task[None] | None = None
        self._failed_at = -1e18

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
        await self.backend.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_models)
            await self.refresh_models()

    async def refresh_models(self) -> None:
        """Ask the upstream's ``/models``; keep the last good list when it fails."""
        names = await self.backend.list_models()
        if names is not None:
            self._discovered = names

    async def ensure_models(self) -> None:
        """List the upstream's models now if nothing tells what its NAME means (it was
        down at start): the first request must not send the NAME as a model name."""
        config = self.config
        if config.discover_models and not (
            config.default_model or config.models or self._discovered
        ):
            await self.refresh_models()

    def model_names(self) -> list[str]:
        config = self.config
        return list(dict.fromkeys([self.name, *config.models, *self._discovered, *config.aliases]))

    def sent_as(self, model: str) -> str | None:
        """The name to send upstream for a request for ``model``; None: not served here."""
        config = self.config
        if model in config.aliases:
            model = config.aliases[model]
        elif not (model == self.name or model in config.models or model in self._discovered):
            return None
        if model == self.name:
            return (
                config.default_model
                or next(iter(config.models), None)
                or next(iter(self._discovered), None)
                or model
            )
        return model

    def mark_failed(self) -> None:
        self._failed_at = time.monotonic()

    def cooling_down(self) -> bool:
        return time.monotonic() - self._failed_at < self.config.cooldown


class Gateway(Backend):
    name = "gateway"

    def __init__(
        self,
        upstreams: list[Upstream],
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
        upstreams = [Upstream(c, BACKENDS[c.kind](c)) for c in configs]
        return cls(
            upstreams,
            aliases=global_aliases(settings),
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
            for name in upstream.model_names():
                seen.setdefault(name, ModelInfo(name, owned_by=upstream.name))
        for alias in self.aliases:
            seen.setdefault(alias, ModelInfo(alias, owned_by="gateway"))
        return list(seen.values())

    def serves(self, model: str) -> bool:
        return model in self.aliases or any(u.sent_as(model) for u in self.upstreams)

    def plan(self, model: str) -> list[tuple[Upstream, str]]:
        """The upstreams to try for ``model``, in order, each with the name it is sent: the
        one place aliases (the gateway's, then each upstream's) are resolved."""
        model = self.aliases.get(model, model)
        if model == DEFAULT_MODEL:
            model = self.default or self._by_priority(self.upstreams)[0].name
            model = self.aliases.get(model, model)
        plan = [(u, sent) for u in self._by_priority(self.upstreams) if (sent := u.sent_as(model))]
        if not plan:
            raise ModelNotFound(model)
        return plan

    def _by_priority(self, upstreams: list[Upstream]) -> list[Upstream]:
        order = {id(u): i for i, u in enumerate(self.upstreams)}
        return sorted(upstreams, key=lambda u: (u.cooling_down(), u.config.priority, order[id(u)]))

    def continuation(self, request: ChatRequest, partial: str) -> ChatRequest | None:
        """Continued (takeover) only where every upstream it may fail over to can."""
        try:
            plan = self.plan(request.model)
        except ModelNotFound:
            return None
        continued = [upstream.backend.continuation(request, partial) for upstream, _ in plan]
        return continued[0] if all(c is not None for c in continued) else None

    # -- streaming -------------------------------------------------------------------------

    def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        relay = _Relayed()
        relay.attempts = self._attempts(request, cancel, relay)
        return relay

    async def _attempts(
        self, request: ChatRequest, cancel: CancelToken, relay: _Relayed
    ) -> AsyncIterator[Event]:
        plan = self.plan(request.model)
        accept_by: float | None = asyncio.get_running_loop().time() + self.accept_wait
        failures: list[BackendError] = []
        for upstream, model in plan:
            config = upstream.config
            for attempt in range(config.retries + 1):
                if cancel.is_cancelled():
                    return
                if attempt:
                    await asyncio.sleep(config.retry_backoff * attempt)
                if model == upstream.name:
                    await upstream.ensure_models()
                    model = upstream.sent_as(model) or model
                call = relay.call = upstream.backend.open(request, cancel, model)
                if relay.sink is not None:
                    call.push_to(relay.sink)  # it pushes once relaying, past failover
                handed = False
                try:
                    async with contextlib.aclosing(
                        self._relay_call(call, upstream, accept_by, relay)
                    ) as events:
                        async for event in events:
                            yield event
                    # Content started: the relay owns the call now, and this generator
                    # ends instead of staying suspended for the stream's life.
                    handed = relay.events is not None
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
                    if not handed:
                        relay.call = None
                        await call.aclose()
                accept_by = None  # announced: later attempts start no new wait
        if not cancel.is_cancelled():
            raise _failed(failures)

    async def _relay_call(
        self, call: UpstreamCall, upstream: Upstream, accept_by: float | None, relay: _Relayed
    ) -> AsyncGenerator[Event, None]:
        """One attempt's events. The first attempt says nothing until the first token or
        ``accept_by``: an upstream 4xx, or every upstream failing fast, is then still a
        clean error response instead of a started stream; a slower upstream starts the
        stream with a progress event, so headers and heartbeats go out. (A timer hands the
        call that event: waiting for the first token takes no task hop of its own.)"""
        if accept_by is not None:
            call.announce_at(
                accept_by, Progress(stage="connecting", message=f"upstream {upstream.name}")
            )
        events = call.events()
        async for event in events:
            if call.content_started:
                # No failover from here on: the relay hands the reader this event, then
                # the call's own events; the attempts end (nothing of theirs is kept).
                relay.first = event
                relay.events = events
                return
            yield event


def _failed(failures: list[BackendError]) -> BackendError:
    """The error when every attempt failed before the first token."""
    if not failures:
        return BackendUnavailable("no upstream answered", code="upstream_unreachable")
    if len(failures) == 1:
        return failures[0]
    last = failures[-1]
    messages = "; ".join(f.message for f in failures)
    return type(last)(f"every upstream failed before the first token: {messages}", code=last.code)


def global_aliases(settings: Settings) -> dict[str, str]:
    """The ``[aliases]`` table: names clients may use for a model or an upstream NAME."""
    return {str(k): str(v) for k, v in (settings.extra.get("aliases") or {}).items()}


class _Relayed(AsyncIterator[Event]):
    """``Gateway.stream``'s events: the failover attempts until the first token, then the
    upstream call's own events, taken directly: no generator of the gateway's resumed per
    chunk, none kept suspended for the stream's life. The attempts end at the first token,
    handing over the call (``call``), its events (``events``) and that token (``first``);
    closing the relay closes the call's events and the call, or the attempts before that
    (their ``finally`` closes the call). A sink given to ``push_to`` goes to each upstream
    call (``backends.base.PushSource``)."""

    __slots__ = ("attempts", "call", "events", "first", "sink")

    def __init__(self) -> None:
        self.attempts: AsyncIterator[Event] | None = None
        self.events: AsyncIterator[Event] | None = None
        self.first: Event | None = None
        self.call: UpstreamCall | None = None
        self.sink: EventSink | None = None

    def push_to(self, sink: EventSink) -> None:
        # The manager offers it after the stream's first event, before the call relays.
        self.sink = sink
        if self.call is not None:
            self.call.push_to(sink)

    def __anext__(self) -> Awaitable[Event]:
        if self.first is None and self.events is not None:
            return self.events.__anext__()
        if self.attempts is None:
            return _closed()  # as an async generator after aclose()
        return self._attempt()

    async def _attempt(self) -> Event:
        assert self.attempts is not None
        try:
            return await self.attempts.__anext__()
        except StopAsyncIteration:
            first, self.first = self.first, None
            if first is None:
                raise
            self.attempts = None  # ended: the call is the relay's
            return first

    async def aclose(self) -> None:
        events, self.events = self.events, None
        attempts, self.attempts = self.attempts, None
        call, self.call = self.call, None
        self.first = None
        try:
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]
        finally:
            if attempts is not None:
                await attempts.aclose()  # type: ignore[attr-defined]
            elif call is not None:
                await call.aclose()


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
    for alias, target in global_aliases(settings).items():
        router.alias(alias, target)  # only to pick the backend; the gateway resolves it
    return router
