"""``tokenwire serve`` with a timestamp at every stage a request's first token passes.

Run as ``python benchmarks/_ttft_probe.py OUT serve ...`` (``ttft_breakdown.py`` does): it
wraps the functions below to note ``(CLOCK_MONOTONIC ns, stage)`` in a list, runs the CLI,
and writes the list to ``OUT`` (JSON) when the server exits. Nothing in ``src/`` changes;
a note costs well under a microsecond.

The stages, in the order a streamed request's first token meets them (``STAGES``), are
named for what has just happened. The requests must come one at a time: the analysis
assigns each note to the request whose window holds it.
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

NOTES: list[tuple[int, str]] = []

#: The stages in the order a request's first token meets them. ``ttft_breakdown.py`` adds
#: its client's and the upstream's own clocks (request written, first token written and
#: read) and names the first upstream read after the token was written.
STAGES = [
    "request bytes arrive",
    "request head parsed",
    "handler called (routing, middleware)",
    "body read",
    "parsed (ChatRequest)",
    "admitted",
    "manager.start",
    "producer task runs",
    "gateway planned",
    "models known",
    "upstream call created (tasks, timer)",
    "opening task runs",
    "httpx built and handed over the request",
    "new upstream connection: connecting",
    "new upstream connection: connected",
    "upstream connection acquired",
    "request written to the upstream",
    "upstream bytes arrive",
    "upstream response head → httpx.Response",
    "upstream wrote the first token",
    "first token bytes arrive",
    "first token decided (ready set)",
    "producer has the first event",
    "stream.started journaled",
    "first token journaled",
    "manager.start returned (handler resumes)",
    "response built",
    "response starts (headers)",
    "headers written",
    "stream body runs (handoff)",
    "open comment written",
    "first token frame written",
    "client read the first token",
]
_now = time.monotonic_ns


def note(stage: str) -> None:
    NOTES.append((_now(), stage))


def after(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        NOTES.append((_now(), stage))
        return result

    return wrapper


def before(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        NOTES.append((_now(), stage))
        return fn(*args, **kwargs)

    return wrapper


def around_async(enter: str | None, leave: str | None, fn: Callable[..., Any]) -> Any:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if enter:
            NOTES.append((_now(), enter))
        result = await fn(*args, **kwargs)
        if leave:
            NOTES.append((_now(), leave))
        return result

    return wrapper


#: Stages whose function was not found in this tree (the server's modules move).
MISSING: list[str] = []


def wrap(module: str, path: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``module``'s ``path`` (``Class.method``) with ``make(original)``; note it in
    ``MISSING`` instead of failing when this tree has no such function."""
    import importlib

    try:
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, name)
    except (ImportError, AttributeError):
        MISSING.append(f"{module}.{path}")
        return
    setattr(owner, name, make(original))


def install() -> None:
    """Wrap each stage's function; each is looked up where this tree has it."""

    def first_token(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any) -> Any:
            ready = self.ready.done()
            result = original(self, *args)
            if not ready and self.ready.done():
                note("first token decided (ready set)")
            return result

        return wrapper

    def journal_append(original: Callable[..., Any]) -> Callable[..., Any]:
        async def append(self: Any, stream_id: str, event: Any) -> Any:
            result = await original(self, stream_id, event)
            if event.seq == 0:
                note("stream.started journaled")
            elif event.seq == 1:
                note("first token journaled")
            return result

        return append

    def cycle_send(original: Callable[..., Any]) -> Callable[..., Any]:
        async def send(self: Any, message: Any) -> None:
            await original(self, message)
            if message["type"] == "http.response.start":
                note("headers written")
                return
            body = message.get("body", b"")
            if b'"content":"0@' in body:
                note("first token frame written")
            elif body.startswith(b":"):
                note("open comment written")

        return send

    http, app = "tokenwire.server.http", "tokenwire.server.app"
    wrap(http, "HttpProtocol.data_received", lambda f: before("request bytes arrive", f))
    wrap(http, "HttpProtocol.on_headers_complete", lambda f: after("request head parsed", f))
    wrap(
        app,
        "Server.create",
        lambda f: around_async("handler called (routing, middleware)", None, f),
    )
    wrap(app, "Server.read_json", lambda f: around_async(None, "body read", f))
    wrap(
        "tokenwire.protocols.openai_chat",
        "OpenAIChat.parse",
        lambda f: after("parsed (ChatRequest)", f),
    )
    wrap(app, "Server.admit", lambda f: after("admitted", f))
    wrap(
        "tokenwire.streams",
        "StreamManager.start",
        lambda f: around_async("manager.start", "manager.start returned (handler resumes)", f),
    )
    wrap(
        "tokenwire.streams",
        "StreamManager._produce",
        lambda f: around_async("producer task runs", None, f),
    )
    wrap("tokenwire.gateway", "Gateway.plan", lambda f: after("gateway planned", f))
    for module, path in (
        ("tokenwire.gateway", "Upstream.ensure_models"),
        ("tokenwire.backends._upstream", "UpstreamBackend.ensure_models"),
    ):
        wrap(module, path, lambda f: around_async(None, "models known", f))
    for module in ("tokenwire.backends._call", "tokenwire.backends._upstream"):
        wrap(
            module,
            "UpstreamCall.__init__",
            lambda f: after("upstream call created (tasks, timer)", f),
        )
        wrap(module, "UpstreamCall._send", lambda f: around_async("opening task runs", None, f))
        wrap(module, "UpstreamCall._first_content", first_token)
        wrap(module, "UpstreamCall._push", first_token)
    transport = "tokenwire.backends._transport"
    wrap(
        transport,
        "UpstreamTransport.handle_async_request",
        lambda f: around_async(
            "httpx built and handed over the request",
            "upstream response head → httpx.Response",
            f,
        ),
    )
    wrap(
        transport,
        "UpstreamTransport._connect",
        lambda f: around_async(
            "new upstream connection: connecting", "new upstream connection: connected", f
        ),
    )
    wrap(
        transport,
        "UpstreamTransport._acquire",
        lambda f: around_async(None, "upstream connection acquired", f),
    )
    wrap(
        transport,
        "_Connection.write",
        lambda f: around_async(None, "request written to the upstream", f),
    )
    wrap(transport, "_Connection.data_received", lambda f: before("upstream bytes arrive", f))
    memory = "tokenwire.journal.memory"
    wrap(
        memory,
        "MemoryJournal.create",
        lambda f: around_async("producer has the first event", None, f),
    )
    wrap(memory, "MemoryJournal.append", journal_append)
    wrap(app, "Server.event_stream", lambda f: after("response built", f))
    sse = "tokenwire.transports.sse"
    wrap(
        sse,
        "EventSourceResponse.__call__",
        lambda f: around_async("response starts (headers)", None, f),
    )
    wrap(
        sse,
        "EventSourceResponse.stream",
        lambda f: around_async("stream body runs (handoff)", None, f),
    )
    wrap("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle.send", cycle_send)
    wrap(http, "DirectWrite.write", lambda f: after("frame written directly", f))


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["tokenwire", *sys.argv[2:]]

    def dump() -> None:
        with open(out, "w") as f:
            json.dump({"notes": NOTES, "missing": MISSING}, f)

    atexit.register(dump)
    import tokenwire.gateway  # noqa: F401  (the module install() patches)

    install()
    from tokenwire.cli.main import main as cli

    sys.exit(cli())


if __name__ == "__main__":
    main()
