"""The upstreams' httpx transport: pooled HTTP/1.1 keep-alive connections on asyncio
protocols, responses parsed by httptools (llhttp, the parser uvicorn uses).

httpx stays the client: requests, timeouts, TLS contexts, responses and exceptions are
httpx's. This replaces only what sits under ``httpx.AsyncHTTPTransport`` (httpcore's pool
on anyio streams, h11 parsing), for the shape of an upstream relay: a few long responses,
each one HTTP chunk per SSE message.

Why: with httpcore, every HTTP chunk was one h11 event (pure-Python parsing) carried up
through six async-generator layers, and every network read cost an anyio cancel scope, an
``Event`` and two selector updates (pausing, then resuming the socket's reading). At
saturation that was half of the relay's CPU per chunk, and most of the producer's work on
a lone chunk's path. Here llhttp de-chunks in C as bytes arrive (``data_received``), and
the body iterator hands over *everything received so far* in one piece per wake-up, so a
read that brought ten chunks costs one pass, not ten. A read without a read timeout arms
no timer (the relay keeps its own first-token and idle deadlines).

What it promises (tests/test_relay_transport.py):
- connections are pooled per (scheme, host, port) and reused after a complete response
  that allows keep-alive; at most ``max_connections`` open at once (waiters get
  ``PoolTimeout`` after the pool timeout); idle ones expire after ``keepalive_expiry``;
  one the server closed while idle is never reused;
- closing a response before its end closes its connection (the upstream sees the client
  leave and stops generating);
- a body cut short raises ``httpx.RemoteProtocolError``, bad framing
  ``httpx.RemoteProtocolError``, refused connections ``httpx.ConnectError``, timeouts
  ``httpx.ConnectTimeout`` / ``ReadTimeout`` / ``PoolTimeout``;
- reading is paused while 256 KiB of a body wait unread (flow control).
Not supported (not needed by an upstream relay): proxies, HTTP/2, ``Expect: 100-continue``,
protocol upgrades.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httptools
import httpx

__all__ = ["UpstreamTransport", "direct_body"]

#: Unread body bytes past which the socket's reading is paused.
_HIGH_WATER = 256 * 1024

_Key = tuple[bytes, bytes, int]


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; parses the response of the request in flight."""

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.reason = b""
        self.status = 0
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.until_eof = False  # the body ends when the connection does (no framing)
        self.keep_alive = False
        self.complete = False
        self.body: list[bytes] = []
        self.size = 0
        self.closed = False
        self.error: Exception | None = None
        self.idle_since = 0.0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self.write_paused = False
        #: The body's push reader (``_Body.push_to``): takes each read's bytes in this
        #: callback; True when its reader need not wake.
        self.push: Callable[[bytes], bool] | None = None
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()

    # -- asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes on an idle connection or after the response: it cannot be trusted again.
            self.error = httpx.RemoteProtocolError("unexpected data after the response")
            self.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"malformed HTTP response: {exc}")
            self.close()
        push = self.push
        if push is not None and self.body:
            taken = push(self.take_body())
            if taken and not (self.complete or self.closed or self.error is not None):
                return  # all handed on; the reader sleeps on
        if self.size > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._ended()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        self.write_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _ended(self) -> None:
        if not self.closed:
            self.closed = True
            if self.until_eof and self.headers_done:
                self.complete = True
            self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- httptools -----------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        self.keep_alive = parser.should_keep_alive()
        status = self.status = parser.get_status_code()
        self.version = parser.get_http_version()
        framed = any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers
        )
        self.until_eof = not framed and status >= 200 and status not in (204, 304)
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- for the transport ---------------------------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float | None) -> None:
        """Until something arrives (or the connection ends)."""
        waiter = self._waiter = self._loop.create_future()
        if seconds is None:
            await waiter  # no timer per read: the relay keeps its own deadlines
            return
        try:
            async with asyncio.timeout(seconds):
                await waiter
        except TimeoutError:
            raise httpx.ReadTimeout(f"no data for {seconds:g}s") from None

    def take_body(self) -> bytes:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def start(self) -> None:
        """Ready to parse the response of a new request."""
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.headers = []
        self.headers_done = self.until_eof = self.keep_alive = self.complete = False
        self.body = []
        self.size = 0
        self.push = None

    async def write(self, data: bytes, seconds: float | None) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise httpx.WriteError("the connection is closed")
        transport.write(data)
        if self.write_paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(seconds):
                    await self._drained
            except TimeoutError:
                raise httpx.WriteTimeout(f"could not write for {seconds:g}s") from None

    def reusable(self, now: float, expiry: float | None) -> bool:
        return (
            not self.closed
            and self.error is None
            and not self.body
            and (expiry is None or now - self.idle_since < expiry)
        )

    def close(self) -> None:
        self.parser = None
        if self.transport is not None:
            self.transport.close()
        self._ended()


class _Body(httpx.AsyncByteStream):
    """A response body: everything received since the last read, in one piece."""

    def __init__(
        self, transport: UpstreamTransport, connection: _Connection, timeout: float | None
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        timeout = self._timeout
        try:
            while True:
                if connection.body:
                    yield connection.take_body()
                elif connection.complete:
                    break
                elif connection.error is not None:
                    raise connection.error
                elif connection.closed:
                    raise httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body"
                    )
                else:
                    await connection.wait(timeout)
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()

    # -- the relay's direct read (no async-generator layers per chunk) --------------------
    #
    # Iterating a response (``aiter_raw``) resumes three async generators per chunk (httpx's
    # ``aiter_raw`` and ``BoundAsyncStream``, then ``__aiter__`` above), and a coroutine per
    # wait. A relay reading a lone chunk pays that cold, so it reads through ``take`` and
    # awaits ``waiter()`` instead: the same states, errors and release as ``__aiter__``.

    def take(self) -> bytes | None:
        """Everything received since the last read; ``None`` if nothing yet (await
        ``waiter()``), ``b""`` at the end of the body. Raises as iterating does."""
        connection = self._connection
        if connection is None:
            return b""
        if connection.body:
            data = connection.take_body()
            if data:
                return data
        if connection.complete:
            self._release()
            return b""
        if connection.error is not None:
            self._release()
            raise connection.error
        if connection.closed:
            self._release()
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        return None

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved when more of the body arrives (or the connection ends). A
        reader cancelled while awaiting it closes the body (``close``), as ``__aiter__``."""
        connection = self._connection
        assert connection is not None
        waiter = connection._waiter = connection._loop.create_future()
        return waiter

    def push_to(self, handler: Callable[[bytes], bool] | None) -> None:
        """From now on, hand each read's bytes to ``handler`` in the network callback,
        instead of waking the reader (``None``: stop). ``handler`` returns True when the
        reader may sleep on; the reader wakes anyway at the end of the body or an error.
        Bytes received before this call are still the reader's to ``take``."""
        connection = self._connection
        if connection is not None:
            connection.push = handler

    def close(self) -> None:
        """Stop reading: the connection goes back to the pool only if the response is
        complete, else it is closed (the upstream sees the client leave)."""
        self._release()

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.push = None
            self._transport._release(connection)

    async def aclose(self) -> None:
        self._release()


def direct_body(response: httpx.Response) -> _Body | None:
    """The ``_Body`` under an httpx response of ``UpstreamTransport`` (None: another
    transport's, read it by iterating)."""
    stream = response.stream
    body = getattr(stream, "_stream", stream)  # httpx's client wraps it in a BoundAsyncStream
    return body if type(body) is _Body and body._timeout is None else None


class UpstreamTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` for HTTP/1.1 upstreams (see the module docstring)."""

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._max = limits.max_connections or 1_000_000
        self._max_idle = (
            limits.max_keepalive_connections
            if limits.max_keepalive_connections is not None
            else self._max
        )
        self._expiry = limits.keepalive_expiry
        self._idle: dict[_Key, list[_Connection]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    # -- the pool ------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    async def _acquire(self, key: _Key, timeouts: dict[str, Any]) -> _Connection:
        loop = asyncio.get_running_loop()
        pool_timeout = timeouts.get("pool")
        deadline = None if pool_timeout is None else loop.time() + pool_timeout
        while True:
            now = time.monotonic()
            idle = self._idle.get(key)
            while idle:
                connection = idle.pop()
                if connection.reusable(now, self._expiry):
                    return connection
                self._discard(connection)
            if self._open >= self._max:
                self._close_oldest_idle()  # an idle connection to another host makes room
            if self._open < self._max:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise httpx.PoolTimeout("no connection became free in time") from None
        self._open += 1
        try:
            return await self._connect(key, timeouts.get("connect"))
        except BaseException:
            self._open -= 1
            self._wake_waiter()
            raise

    def _close_oldest_idle(self) -> None:
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is not None:
            self._idle[oldest.key].remove(oldest)
            self._discard(oldest)

    async def _connect(self, key: _Key, seconds: float | None) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        hostname = host.decode("ascii")
        tls = self._ssl_context() if scheme == b"https" else None
        try:
            async with asyncio.timeout(seconds):
                _, connection = await loop.create_connection(
                    lambda: _Connection(key),
                    hostname,
                    port,
                    ssl=tls,
                    server_hostname=hostname if tls is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {hostname}:{port} took too long") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return connection

    def _release(self, connection: _Connection) -> None:
        """The response is closed: keep its connection for the next request, or close it."""
        if (
            not self._closed
            and connection.complete
            and connection.keep_alive
            and not connection.closed
            and connection.error is None
            and not connection.body
        ):
            connection.parser = None
            connection.idle_since = time.monotonic()
            idle = self._idle.setdefault(connection.key, [])
            if len(idle) < self._max_idle:
                idle.append(connection)
                self._wake_waiter()
                return
        self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open -= 1
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- httpx ---------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme.decode()!r}")
        port = url.port or (443 if scheme == b"https" else 80)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        connection = await self._acquire((scheme, url.raw_host, port), timeouts)
        try:
            connection.start()
            await self._send(connection, request, timeouts.get("write"))
            read_timeout = timeouts.get("read")
            while not connection.headers_done:
                if connection.error is not None:
                    raise connection.error
                if connection.closed:
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response."
                    )
                await connection.wait(read_timeout)
        except BaseException:
            self._discard(connection)
            raise
        return httpx.Response(
            status_code=connection.status,
            headers=connection.headers,
            stream=_Body(self, connection, read_timeout),
            extensions={
                "http_version": f"HTTP/{connection.version}".encode(),
                "reason_phrase": connection.reason,
            },
        )

    async def _send(
        self, connection: _Connection, request: httpx.Request, seconds: float | None
    ) -> None:
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        chunked = False
        for name, value in request.headers.raw:
            head.append(b"%s: %s\r\n" % (name, value))
            if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
        head.append(b"\r\n")
        assert isinstance(request.stream, httpx.AsyncByteStream)
        if not chunked:
            parts = [b"".join(head)]
            async for part in request.stream:
                parts.append(part)
            await connection.write(b"".join(parts), seconds)
            return
        await connection.write(b"".join(head), seconds)
        async for part in request.stream:
            if part:
                await connection.write(b"%x\r\n%s\r\n" % (len(part), part), seconds)
        await connection.write(b"0\r\n\r\n", seconds)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                self._discard(connection)
        self._idle.clear()
