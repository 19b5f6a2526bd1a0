"""transports/sse.py and server/http.py: heartbeats from the one scheduler per loop, disconnect,
send timeout, the stream hand-off, and uvicorn's protocol with lean events.

The transport is driven at the ASGI level with recording receive/send callables on a real
event loop; the protocol by a real uvicorn on a loopback port, talked to over raw sockets.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from tokenwire.cancel import LeanEvent
from tokenwire.server.http import HttpProtocol
from tokenwire.transports.sse import EventSourceResponse, StreamHandoff, heartbeat_scheduler

from .conftest import free_port

pytestmark = pytest.mark.anyio

PING = b": ping\n"
OPEN = b": stream open\n"


class Client:
    """The ASGI side of one response: records what it sends (with the loop time); receive
    blocks until ``leave()``, then says the client disconnected."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, Message]] = []
        self._gone = asyncio.Event()

    async def receive(self) -> Message:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append((asyncio.get_running_loop().time(), message))

    def leave(self) -> None:
        self._gone.set()

    def bodies(self) -> list[tuple[float, bytes]]:
        return [(t, m["body"]) for t, m in self.sent if m["type"] == "http.response.body"]


class Frames:
    """A frame iterator that yields what ``put`` gives it and records that it was closed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed_at: float | None = None

    def put(self, frame: bytes | None) -> None:
        self.queue.put_nowait(frame)

    async def __call__(self) -> AsyncIterator[bytes]:
        try:
            while (frame := await self.queue.get()) is not None:
                yield frame
        finally:
            self.closed_at = asyncio.get_running_loop().time()


async def wait_for(condition: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_heartbeats_arrive_on_time_on_several_streams() -> None:
    heartbeat = 0.1
    clients = [Client() for _ in range(5)]
    sources = [Frames() for _ in clients]
    tasks = [
        asyncio.create_task(
            EventSourceResponse(source(), heartbeat=heartbeat)({"type": "http"}, c.receive, c.send)
        )
        for c, source in zip(clients, sources, strict=True)
    ]
    await asyncio.sleep(0.45)
    sources[0].put(b"data: one\n\n")  # a frame resets stream 0's idle clock
    await asyncio.sleep(0.8)
    for client in clients:
        client.leave()
    with anyio_timeout(10):
        await asyncio.gather(*tasks)

    for index, client in enumerate(clients):
        start = client.sent[0][1]
        assert start["type"] == "http.response.start"
        assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
        bodies = client.bodies()
        assert bodies[0][1] == OPEN
        assert bodies[-1][1] == b""  # the response is completed after the disconnect
        live = bodies[:-1]
        # Each ping's gap since the send before it (a ping or a frame): never early (1 ms
        # of clock resolution), and on time in the main.
        gaps = [t - live[i][0] for i, (t, body) in enumerate(live[1:]) if body == PING]
        assert min(gaps) >= heartbeat - 0.002, gaps
        assert statistics.median(gaps) < heartbeat * 2, gaps
        pings = [t for t, body in live if body == PING]
        assert len(pings) >= 5, live  # ~11 in 1.25 s when the machine is quiet
        if index == 0:
            frame_at = next(t for t, body in live if body == b"data: one\n\n")
            after = [t for t in pings if t > frame_at]
            assert after and after[0] - frame_at >= heartbeat - 0.002
        else:
            assert all(body in (OPEN, PING) for _, body in live)


async def test_disconnect_ends_the_stream_stops_pings_and_closes_frames() -> None:
    heartbeat = 0.05
    client, source = Client(), Frames()
    response = EventSourceResponse(source(), heartbeat=heartbeat)
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    await wait_for(lambda: sum(1 for _, b in client.bodies() if b == PING) >= 2)
    loop = asyncio.get_running_loop()
    left_at = loop.time()
    client.leave()
    with anyio_timeout(5):
        await task
    assert source.closed_at is not None and source.closed_at - left_at < 1.0
    sent = len(client.sent)
    await asyncio.sleep(heartbeat * 6)
    assert len(client.sent) == sent  # no ping after the disconnect
    # The scheduler forgets the stream once its bucket has fired.
    assert len(heartbeat_scheduler()) == 0


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout() -> None:
    blocked = asyncio.get_running_loop().create_future()  # a socket that never drains
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body", b"").startswith(b"data:"):
            await blocked

    client, source = Client(), Frames()
    response = EventSourceResponse(source(), heartbeat=0.05, send_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    source.put(b"data: stuck\n\n")
    with anyio_timeout(10):
        await response({"type": "http"}, client.receive, send)
    took = loop.time() - started
    assert 0.3 - 0.002 <= took < 5.0
    assert source.closed_at is not None
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    # No ping while the frame send was stuck, and no completion of the response.
    assert bodies == [OPEN, b"data: stuck\n\n"], bodies
    assert not blocked.done() or blocked.cancelled()


async def test_shutdown_cancels_the_stream_from_outside() -> None:
    client, source = Client(), Frames()
    task = asyncio.create_task(
        EventSourceResponse(source(), heartbeat=0.05)({"type": "http"}, client.receive, client.send)
    )
    await wait_for(lambda: len(client.bodies()) >= 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError), anyio_timeout(5):
        await task
    assert source.closed_at is not None


async def test_stream_handoff_runs_the_body_after_the_inner_layers_returned() -> None:
    client, source = Client(), Frames()
    layer_returned = asyncio.Event()

    async def layer(scope: Scope, receive: Receive, send: Send) -> None:
        """A middleware and route in one: adds a header on the way out, then returns."""

        async def add_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-layer", b"1")]
            await send(message)

        await EventSourceResponse(source(), heartbeat=0.05)(scope, receive, add_header)
        layer_returned.set()

    scope: Scope = {"type": "http"}
    task = asyncio.create_task(StreamHandoff(layer)(scope, client.receive, client.send))
    with anyio_timeout(10):
        await layer_returned.wait()
        await wait_for(lambda: any(b == PING for _, b in client.bodies()))
    assert not task.done()  # the stream lives on in the hand-off layer
    assert (b"x-layer", b"1") in client.sent[0][1]["headers"]
    source.put(b"data: last\n\n")
    source.put(None)  # the frames end: the stream completes
    with anyio_timeout(10):
        await task
    bodies = [b for _, b in client.bodies()]
    assert bodies[0] == OPEN and bodies[-2:] == [b"data: last\n\n", b""]


async def test_lean_event_behaves_like_asyncio_event() -> None:
    event = LeanEvent()
    assert not event.is_set()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        assert await event.wait() is True
        woken.append(n)

    waiters = [asyncio.create_task(waiter(n)) for n in range(3)]
    cancelled = asyncio.create_task(event.wait())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    assert woken == []
    event.set()
    with anyio_timeout(5):
        await asyncio.gather(*waiters)
    assert sorted(woken) == [0, 1, 2] and event.is_set()
    assert await event.wait() is True  # set: returns at once
    event.clear()
    assert not event.is_set()
    late = asyncio.create_task(event.wait())
    await asyncio.sleep(0.01)
    assert not late.done()
    event.set()
    with anyio_timeout(5):
        assert await late is True


# -- uvicorn with server/http.py's protocol ---------------------------------------------------


def protocol_app() -> Any:
    """Routes exercising each lean container: request body events, flow control on a
    large response, pipelining, and the disconnect of an idle event stream."""
    state: dict[str, Any] = {"idle_closed": threading.Event(), "send_seconds": []}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        cycle = receive.__self__  # type: ignore[attr-defined]
        # uvicorn's internals server/http.py replaces (a rename fails here, not silently).
        assert isinstance(cycle.message_event, LeanEvent)
        assert isinstance(cycle.flow._is_writable_event, LeanEvent)
        path = scope["path"]
        if path == "/echo":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
        elif path == "/big":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            chunk = b"x" * 65536
            for _ in range(256):  # 16 MB: more than the kernel buffers hold
                started = time.monotonic()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                state["send_seconds"].append(time.monotonic() - started)
            await send({"type": "http.response.body", "body": b""})
        elif path == "/idle":

            async def frames() -> AsyncIterator[bytes]:
                try:
                    await asyncio.Event().wait()
                    yield b""
                finally:
                    state["idle_closed"].set()

            await EventSourceResponse(frames(), heartbeat=5)(scope, receive, send)
        else:
            body = path.encode()
            headers = [(b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    return StreamHandoff(app), state


@contextmanager
def uvicorn_server(app: Any) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=HttpProtocol,
        loop="uvloop",
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def read_response(sock: socket.socket, until: bytes) -> bytes:
    data = b""
    while until not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.timeout(60)
def test_uvicorn_with_the_lean_protocol() -> None:
    app, state = protocol_app()
    with uvicorn_server(app) as port:
        # A request body in three pieces, each waking the handler through the lean event.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nabc")
            time.sleep(0.1)
            sock.sendall(b"def")
            time.sleep(0.1)
            sock.sendall(b"ghi")
            assert read_response(sock, b"abcdefghi").startswith(b"HTTP/1.1 200")

        # Two pipelined requests in one write: answered in order (the pipeline list).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            data = read_response(sock, b"/second")
            assert data.index(b"/first") < data.index(b"/second")

        # A client that reads late: the server's sends wait on flow control, then resume.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1.0)
            received = 0
            while received < 256 * 65536:
                chunk = sock.recv(1 << 20)
                assert chunk
                received += chunk.count(b"x")
        assert max(state["send_seconds"]) >= 0.3  # a send waited for the client to read

        # An idle event stream notices the disconnect at once (not at the next heartbeat).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
            read_response(sock, OPEN)
        assert state["idle_closed"].wait(3.0)


def direct_write_app() -> Any:
    """``/mixed``: 1,000 frames of 16 KB (more than the kernel buffers hold) from a producer
    task, each written with ``send_now`` while the stream's frame iterator waits with nothing
    queued (the journal's contract), else queued for the iterator."""
    state: dict[str, Any] = {"direct": 0, "queued": 0, "done": threading.Event()}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        waiting = False

        async def frames() -> AsyncIterator[bytes]:
            nonlocal waiting
            while True:
                waiting = queue.empty()
                item = await queue.get()
                waiting = False
                if item is None:
                    return
                yield item

        response = EventSourceResponse(frames(), heartbeat=0)

        async def produce() -> None:
            await asyncio.sleep(0.1)
            for i in range(1000):
                frame = b"data: %d %s\n\n" % (i, b"x" * 16384)
                if waiting and queue.empty() and response.send_now(bytes, frame):
                    state["direct"] += 1
                else:
                    state["queued"] += 1
                    queue.put_nowait(frame)
                await asyncio.sleep(0.001 if i < 50 else 0)
            queue.put_nowait(None)
            state["done"].set()

        # Runs on after this returns (StreamHandoff runs the body then), until its end.
        state["producer"] = asyncio.ensure_future(produce())
        await response(scope, receive, send)

    return StreamHandoff(app), state


@pytest.mark.timeout(60)
def test_direct_writes_keep_order_and_give_way_to_flow_control() -> None:
    app, state = direct_write_app()
    with (
        uvicorn_server(app) as port,
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /mixed HTTP/1.1\r\nHost: x\r\n\r\n")
        # Read the first frames, then stop reading: the socket fills, uvicorn pauses
        # writing, and the direct write must refuse until the client reads again.
        data = read_response(sock, b"data: 40 ")
        assert state["done"].wait(10)  # the producer never blocked on the slow client
        while b"0\r\n\r\n" not in data[-16:]:
            chunk = sock.recv(1 << 20)
            assert chunk
            data += chunk
    assert state["direct"] >= 40  # while the client kept up: written from the producer
    assert state["queued"] >= 100  # while flow control held writes: through the iterator
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    # De-chunk by hand: every frame arrives once, whole, in order.
    pieces, at = [], 0
    while size := int(body[at : body.index(b"\r\n", at)], 16):
        start = body.index(b"\r\n", at) + 2
        pieces.append(body[start : start + size])
        at = start + size + 2
    payload = b"".join(pieces)
    numbers = [int(line.split()[1]) for line in payload.split(b"\n") if line.startswith(b"data:")]
    assert numbers == list(range(1000))


def anyio_timeout(seconds: float):  # type: ignore[no-untyped-def]
    import anyio

    return anyio.fail_after(seconds)
