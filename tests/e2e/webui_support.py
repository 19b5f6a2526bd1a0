"""Support for the browser tests of the web UI: chromium, a scripted backend, a cuttable proxy.

The scripted backend is for what the real model cannot be made to say on demand (hostile
HTML, tool calls, partial JSON, a fixed rich answer for screenshots). Streaming behaviour
itself is tested against the real embedded model.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.conftest import free_port, wait_until_healthy
from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.config import Settings
from tokenwire.events import (
    TERMINAL_TYPES,
    Event,
    JsonPartial,
    Progress,
    StreamCompleted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    Usage,
)
from tokenwire.requests import ChatRequest
from tokenwire.server.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

HOSTILE_MARKDOWN = """\
Here is some **hostile** output.

<img src=x onerror="window.__pwned='img';alert('img')">

<script>window.__pwned='script';alert('script')</script>

<svg onload="window.__pwned='svg'"></svg>
<iframe srcdoc="<script>parent.__pwned='iframe'</script>"></iframe>

[click me](javascript:window.__pwned='link';alert('link'))
and [mixed case](JaVaScRiPt:window.__pwned='case') and [tabbed](java\tscript:window.__pwned='tab')
and [data](data:text/html,<script>alert(1)</script>) and <javascript:window.__pwned='auto'>
and ![pic](javascript:window.__pwned='image') and <a href="javascript:alert(1)">raw anchor</a>
and <b onmouseover="window.__pwned='hover'">hover me</b> and [ok link](https://example.com/docs).

```html
<script>window.__pwned='code'</script>
```
"""

DEMO_MARKDOWN = """\
## Streaming, the short version

tokenwire sends **each token** as it is produced, and keeps a *numbered log* so a client \
can resume after a drop. Use `POST /v1/streams` to start:

1. Send the chat body.
2. Read `event:` / `id:` / `data:` frames.
   - `text.delta` carries text
   - `usage` carries TTFT and tokens/s
3. On a drop, `GET /v1/streams/{id}?after=N`.

```python
import httpx

def stream(prompt: str) -> None:
    # Print tokens as they arrive.
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", "http://127.0.0.1:8000/v1/streams", json=body) as r:
        for line in r.iter_lines():
            print(line)  # 42 tokens later...
```

| Event | Meaning |
|---|---|
| `stream.completed` | finished |
| `stream.cancelled` | stopped |

> Stop really stops the model: decoding ends server-side.
"""


#: An answer a guard stops: ``GUARD`` (given to the scripted server) matches its code.
GUARDED_ANSWER = "The door code is SECRET-4821, keep it to yourself. More text follows."
GUARD = r"secret-code=SECRET-\d{4}"


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass
class ScriptedBackend(Backend):
    """Answers by keyword in the last user message; ``gap`` seconds between events.

    ``hostile``: model-written HTML/JS; ``tools``: a tool call whose arguments stream, then
    partial JSON; ``demo``: rich markdown; ``secret``: an answer that ``GUARD`` stops;
    ``server tool``: a tool the server ran (``tool.result``);
    anything else: echoes the request back.
    ``gates``: the ``tools`` script waits at "args" (arguments streamed, not yet complete)
    and at "json" (partial JSON shown, not yet final) until the test sets that event.
    """

    gap: float = 0.03
    gates: dict[str, threading.Event] = field(default_factory=dict)
    requests: list[ChatRequest] = field(default_factory=list)
    name: str = "scripted"

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("scripted"), ModelInfo("scripted-2")]

    async def _wait_gate(self, name: str, cancel: CancelToken) -> None:
        gate = self.gates.get(name)
        # A threading.Event: the test sets it from its own thread, outside this loop.
        while gate is not None and not gate.is_set() and not cancel.is_cancelled():
            await asyncio.sleep(0.02)

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        self.requests.append(request)
        prompt = request.messages[-1].content
        yield Progress(stage="prefill")
        started = time.monotonic()
        events: list[Event | str] = []
        if "hostile" in prompt:
            events = [TextDelta(text=c) for c in chunks(HOSTILE_MARKDOWN, 7)]
        elif "demo" in prompt:
            events = [TextDelta(text=c) for c in chunks(DEMO_MARKDOWN, 9)]
        elif "secret" in prompt:
            events = [TextDelta(text=c) for c in chunks(GUARDED_ANSWER, 5)]
        elif "server tool" in prompt:
            events = [
                TextDelta(text="Looking it up."),
                ToolResult(id="call_9", name="lookup", arguments='{"q": "tokenwire"}', output="42"),
                TextDelta(text=" Found 42."),
            ]
        elif "tools" in prompt:
            arguments = '{"city": "Paris", "days": 3, "units": "metric"}'
            events = [
                TextDelta(text="Checking the weather."),
                ToolCallStarted(index=0, id="call_1", name="get_weather"),
                *[ToolCallDelta(index=0, arguments_delta=c) for c in chunks(arguments, 6)],
                "gate:args",
                ToolCallCompleted(index=0, id="call_1", name="get_weather", arguments=arguments),
                JsonPartial(value={"city": "Par"}, path="city"),
                JsonPartial(value={"city": "Paris", "forecast": [18]}, path="forecast.0"),
                "gate:json",
                JsonPartial(value={"city": "Paris", "forecast": [18, 21, 19]}, path=""),
            ]
        else:
            system = next((m.content for m in request.messages if m.role == "system"), "")
            turns = sum(1 for m in request.messages if m.role == "user")
            echo = f"Echo ({request.model}, turn {turns}, system={system!r}): {prompt}"
            events = [TextDelta(text=c) for c in chunks(echo, 5)]
        count = 0
        for event in events:
            if cancel.is_cancelled():
                return
            if isinstance(event, str):
                await self._wait_gate(event.removeprefix("gate:"), cancel)
                continue
            assert isinstance(event, Event)
            await asyncio.sleep(self.gap)
            count += 1
            yield event
        elapsed = max(time.monotonic() - started, 1e-3)
        yield Usage(
            prompt_tokens=len(prompt.split()),
            completion_tokens=count,
            ttft_ms=round(self.gap * 1000, 1),
            tokens_per_second=round(count / elapsed, 1),
        )
        yield StreamCompleted(finish_reason="stop")


@dataclass
class ThreadedServer:
    url: str
    backend: ScriptedBackend
    server: uvicorn.Server
    thread: threading.Thread


@contextlib.contextmanager
def scripted_server(backend: ScriptedBackend, **options: Any) -> Iterator[ThreadedServer]:
    """``create_app(settings, backend=…)`` under uvicorn in a thread, on a free port."""
    port = free_port()
    settings = Settings(port=port, heartbeat=1.0, disconnect_grace=30.0, warmup=False, **options)
    app = create_app(settings, backend=backend)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="scripted-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/healthz", None, timeout=30)
        yield ThreadedServer(url, backend, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class CuttableProxy:
    """A TCP proxy on a free port that can cut every connection at once (a network drop)
    and refuse new ones until restored."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._down = threading.Event()
        self._closed = threading.Event()
        self.cuts = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept, name="cuttable-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if self._down.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        sockets = [client, upstream]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 0.2)
                if self._closed.is_set():
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        """Drop every open connection with a reset and refuse new ones."""
        self._down.set()
        self.cuts += 1
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _reset(client)
            with contextlib.suppress(OSError):
                upstream.close()

    def restore(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close with RST, as a dead network path looks to the browser.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def native_events(url: str, stream_id: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The whole journal of a stream, read with the resume endpoint from seq 0."""
    import httpx
    import orjson

    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/v1/streams/{stream_id}?after=-1", timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = orjson.loads(line[6:])
                events.append(event)
                if event["type"] in TERMINAL_TYPES:
                    break
    return events


def joined_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == TextDelta.type)
