"""uvicorn's httptools HTTP/1.1 protocol with lighter per-connection objects.

An idle SSE stream costs mostly its connection (benchmarks/idle_capacity.py). uvicorn's
protocol gives every connection an empty ``deque`` for pipelined requests and two
``asyncio.Event`` (request body / disconnect, write flow control), each holding a deque:
~0.8 KB apiece, because a deque preallocates a 64-slot block. ``HttpProtocol`` is the same
protocol with cancel.py's ``LeanEvent`` (its waiter list made on first wait) and a list for
the rarely used pipeline: ~2 KB less per open connection. Only those containers differ; parsing,
keep-alive, flow control and the ASGI cycle are uvicorn's own code.

It also offers each request a direct body write (``transports.sse.DIRECT_WRITE_KEY`` in the
scope): an event stream's live frame is written from the task that produced it, a loop step
sooner than through ``send`` (see transports/sse.py). It writes what uvicorn's ``send`` would
for a chunked body, and only when ``send`` would write at once.

It relies on uvicorn internals (``HttpToolsProtocol.pipeline``, ``cycle.message_event``,
``FlowControl._is_writable_event``, and the cycle's response state read by ``DirectWrite``),
which ``tests/test_sse_transport.py`` checks, so a uvicorn release that renames them fails a
test instead of silently falling back.

Use: ``uvicorn.Config(app, http=HttpProtocol)`` (``tokenwire serve`` does).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tokenwire.cancel import LeanEvent
from tokenwire.transports.sse import DIRECT_WRITE_KEY

__all__ = ["DirectWrite", "HttpProtocol"]


class _Pipeline(list[Any]):
    """The queue of pipelined requests: an empty list is 56 bytes, an empty deque 760."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class _FlowControl(FlowControl):
    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        writable = LeanEvent()
        writable.set()
        self._is_writable_event = writable  # type: ignore[assignment]


class DirectWrite:
    """A request cycle's body, written without ``send``'s coroutine (``transports.sse``).

    Holds its cycle weakly: the scope holds this, and the cycle holds the scope.
    """

    __slots__ = ("_cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = weakref.ref(cycle)

    def ready(self) -> bool:
        cycle = self._cycle()
        return (
            cycle is not None
            and cycle.response_started
            and not cycle.response_complete
            and not cycle.disconnected
            and cycle.chunked_encoding is True  # what send would write: one chunk
            and not cycle.flow.write_paused
        )

    def write(self, body: bytes) -> None:
        cycle = self._cycle()
        if cycle is not None:
            cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` with the lean containers above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = _Pipeline()  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _FlowControl(transport)

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:
            # A new request cycle: nothing waits on its event yet (its task has not run).
            self.cycle.message_event = LeanEvent()  # type: ignore[assignment]
            self.scope[DIRECT_WRITE_KEY] = DirectWrite(self.cycle)  # type: ignore[literal-required]
