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


def install() -> None:
    from uvicorn.protocols.http import httptools_impl

    from tokenwire.backends import _transport, _upstream
    from tokenwire.journal import memory
    from tokenwire.protocols import openai_chat
    from tokenwire.server import app, http
    from tokenwire.streams import StreamManager
    from tokenwire.transports import sse

    proto = http.HttpProtocol
    proto.data_received = before("request bytes arrive", proto.data_received)  # type: ignore[method-assign]
    proto.on_headers_complete = after("request head parsed", proto.on_headers_complete)  # type: ignore[method-assign]
    server = app.Server
    server.create = around_async(  # type: ignore[method-assign]
        "handler called (routing, middleware)", None, server.create
    )
    server.read_json = around_async(None, "body read", server.read_json)  # type: ignore[method-assign]
    chat = openai_chat.OpenAIChat
    chat.parse = after("parsed (ChatRequest)", chat.parse)  # type: ignore[method-assign]
    server.admit = after("admitted", server.admit)  # type: ignore[method-assign]
    StreamManager.start = around_async(  # type: ignore[method-assign]
        "manager.start", "manager.start returned (handler resumes)", StreamManager.start
    )
    StreamManager._produce = around_async(  # type: ignore[method-assign]
        "producer task runs", None, StreamManager._produce
    )
    gateway_mod = sys.modules["tokenwire.gateway"]
    gateway_mod.Gateway.plan = after("gateway planned", gateway_mod.Gateway.plan)
    upstream = _upstream.UpstreamBackend
    upstream.ensure_models = around_async(None, "models known", upstream.ensure_models)  # type: ignore[method-assign]
    call = _upstream.UpstreamCall
    call.__init__ = after("upstream call created (tasks, timer)", call.__init__)  # type: ignore[method-assign]
    call._send = around_async("opening task runs", None, call._send)  # type: ignore[method-assign]
    transport = _transport.UpstreamTransport
    transport.handle_async_request = around_async(  # type: ignore[method-assign]
        "httpx built and handed over the request",
        "upstream response head → httpx.Response",
        transport.handle_async_request,
    )
    transport._connect = around_async(  # type: ignore[method-assign]
        "new upstream connection: connecting",
        "new upstream connection: connected",
        transport._connect,
    )
    transport._acquire = around_async(None, "upstream connection acquired", transport._acquire)  # type: ignore[method-assign]
    connection = _transport._Connection
    connection.write = around_async(None, "request written to the upstream", connection.write)  # type: ignore[method-assign]
    connection.data_received = before("upstream bytes arrive", connection.data_received)  # type: ignore[method-assign]
    original_push = call._push

    def push(self: Any, events: list[Any]) -> None:
        had = self._content
        original_push(self, events)
        if not had and self._content:
            note("first token decided (ready set)")

    call._push = push  # type: ignore[method-assign]
    journal = memory.MemoryJournal
    journal.create = around_async(  # type: ignore[method-assign]
        "producer has the first event", None, journal.create
    )
    original_append = journal.append

    async def append(self: Any, stream_id: str, event: Any) -> None:
        await original_append(self, stream_id, event)
        if event.seq == 0:
            note("stream.started journaled")
        elif event.seq == 1:
            note("first token journaled")

    journal.append = append  # type: ignore[method-assign]
    server.event_stream = after("response built", server.event_stream)  # type: ignore[method-assign]
    response = sse.EventSourceResponse
    response.__call__ = around_async("response starts (headers)", None, response.__call__)  # type: ignore[method-assign]
    response.stream = around_async("stream body runs (handoff)", None, response.stream)  # type: ignore[method-assign]
    cycle = httptools_impl.RequestResponseCycle
    original_send = cycle.send

    async def send(self: Any, message: Any) -> None:
        await original_send(self, message)
        if message["type"] == "http.response.start":
            note("headers written")
            return
        body = message.get("body", b"")
        if b'"content":"0@' in body:
            note("first token frame written")
        elif body.startswith(b":"):
            note("open comment written")

    cycle.send = send  # type: ignore[method-assign]
    direct = http.DirectWrite
    direct.write = after("frame written directly", direct.write)  # type: ignore[method-assign]


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["tokenwire", *sys.argv[2:]]

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(NOTES, f)

    atexit.register(dump)
    import tokenwire.gateway  # noqa: F401  (the module install() patches)

    install()
    from tokenwire.cli.main import main as cli

    sys.exit(cli())


if __name__ == "__main__":
    main()
