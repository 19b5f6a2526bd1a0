"""uvicorn's httptools HTTP/1.1 protocol with lighter per-connection objects.

An idle SSE stream costs mostly its connection (benchmarks/idle_capacity.py). uvicorn's
protocol gives every connection an empty ``deque`` for pipelined requests and two
``asyncio.Event`` (request body / disconnect, write flow control), each holding a deque:
~0.8 KB apiece, because a deque preallocates a 64-slot block. ``HttpProtocol`` is the same
protocol with cancel.py's ``LeanEvent`` (its waiter list made on first wait) and a list for
the rarely used pipeline: ~2 KB less per open connection. Only those containers differ; parsing,
keep-alive, flow control and the ASGI cycle are uvicorn's own code.

A response's head goes out with its first body bytes, in one write: uvicorn writes the
status line and headers at ``http.response.start`` and each body message separately, and on
loopback each write system call also runs the client's receive. An event stream's head, its
opening comment and a non-streamed body's only chunk then cost one write instead of two
(``_Cycle``).

It also offers each request a direct body write (``transports.sse.DIRECT_WRITE_KEY`` in the
scope): an event stream's live frame is written from the task that produced it, a loop step
sooner than through ``send`` (see transports/sse.py). It writes what uvicorn's ``send`` would
for a chunked body, and only when ``send`` would write at once. An event stream holds its
writes from its headers to its first frame (``DirectWrite.hold``), so that headers, the
opening comment and a first frame that is ready with them go out in one write; the hold
ends at the loop's next step at the latest, so headers never wait for a slow first token.

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


class _Held:
    """Stands in for the transport while uvicorn writes a response head: keeps the bytes."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _Prefixed:
    """Stands in for the transport while uvicorn writes the first body message: its first
    write carries the held head; anything else goes to the transport itself."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data if head else data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def flush(self) -> None:
        head, self.head = self.head, b""
        if head:
            self.transport.write(head)


class _Cycle(RequestResponseCycle):
    """uvicorn's request cycle, holding the response head until the first body message
    (or a direct write) so that both go out in one write."""

    #: The response head not written yet (set between ``http.response.start`` and the
    #: first body bytes; a class attribute otherwise, so an idle cycle holds nothing).
    held: bytes | None = None

    async def send(self, message: Any) -> None:
        held = self.held
        if held is None:
            if message["type"] != "http.response.start" or self.response_started:
                await super().send(message)
                return
            transport, holder = self.transport, _Held()
            self.transport = holder  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            if holder.data:
                self.held = holder.data
            return
        del self.held
        transport = self.transport
        prefixed = _Prefixed(transport, held)
        self.transport = prefixed  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
            prefixed.flush()  # a message that wrote nothing (HEAD) still sends the head

    def take_held(self) -> bytes:
        """The held head, for a write that goes around ``send`` (``DirectWrite``)."""
        held = self.held
        if held is None:
            return b""
        del self.held
        return held


class _Corked:
    """A cycle's transport while its writes are held (``DirectWrite.hold``): writes are
    collected, to go out as one; everything else is the transport's own."""

    __slots__ = ("parts", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def flush(self) -> None:
        if self.parts:
            data = b"".join(self.parts)
            self.parts = []
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class DirectWrite:
    """A request cycle's body, written without ``send``'s coroutine (``transports.sse``).

    Holds its cycle weakly: the scope holds this, and the cycle holds the scope.
    """

    __slots__ = ("_cycle", "_loop")

    def __init__(self, cycle: RequestResponseCycle, loop: asyncio.AbstractEventLoop) -> None:
        self._cycle = weakref.ref(cycle)
        self._loop = loop

    def hold(self) -> None:
        """Hold the response's writes (its headers, then body chunks) until ``release``,
        or the loop's next step at the latest: what is ready together (headers, the opening
        comment, the first frame) goes out in one write, and nothing waits longer."""
        cycle = self._cycle()
        if cycle is None:
            return
        transport: Any = cycle.transport
        if type(transport) is _Corked:
            return
        cycle.transport = _Corked(transport)  # type: ignore[assignment]
        self._loop.call_soon(self.release)

    def release(self) -> None:
        """Write what was held, in one piece; from now on writes go out at once."""
        cycle = self._cycle()
        if cycle is None:
            return
        held: Any = cycle.transport
        if type(held) is _Corked:
            cycle.transport = held.transport
            held.flush()

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
            head = cycle.take_held() if isinstance(cycle, _Cycle) else b""
            cycle.transport.write(b"%b%x\r\n%b\r\n" % (head, len(body), body))


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
            # A new request cycle: its task has not run yet. Same layout, one more method.
            self.cycle.__class__ = _Cycle
            # Nothing waits on its event yet.
            self.cycle.message_event = LeanEvent()  # type: ignore[assignment]
            self.scope[DIRECT_WRITE_KEY] = DirectWrite(self.cycle, self.loop)  # type: ignore[literal-required]
