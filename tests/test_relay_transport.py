"""The gateway's fast relay path, against the slow paths it replaced.

- ``UpstreamTransport`` (httptools on asyncio protocols, backends/_transport.py) gives the
  same SSE messages as httpx's default transport (httpcore + h11), wherever the upstream's
  HTTP chunks and TCP writes split the bytes: every split offset, CRLF, comments,
  multi-line data, a malformed JSON chunk, bad chunk framing;
- its pool: keep-alive reuse, a response closed early closes its connection (the upstream
  sees the client leave), a connection the server closed while idle is not reused,
  ``max_connections`` with ``PoolTimeout``, refused connections, bodies cut short,
  close-delimited bodies, TLS;
- the memory journal's cheap event size and the lock-free histograms equal the slow ones.

The upstream here is a raw asyncio server that writes exactly the bytes a test gives it.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from tokenwire.backends._transport import UpstreamTransport, direct_body
from tokenwire.codecs.openai import ChatDecoder
from tokenwire.codecs.sse import SSEDecoder
from tokenwire.errors import BackendProtocolError
from tokenwire.server.metrics import LoopHistogram

pytestmark = pytest.mark.anyio

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A raw HTTP server: ``handler`` answers each request; connections are counted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = 0
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        except asyncio.CancelledError:
            pass  # the test is over (asyncio logs a handler task that ends cancelled)
        finally:
            writer.close()


@asynccontextmanager
async def upstream(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Upstream]:
    up = Upstream(handler)
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0, ssl=ssl_context)
    up.port = server.sockets[0].getsockname()[1]
    async with server:
        try:
            yield up
        finally:
            for task in up.tasks:
                task.cancel()
            await asyncio.gather(*up.tasks, return_exceptions=True)


def fast_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=UpstreamTransport(limits=LIMITS))


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` as HTTP chunks cut at ``cuts``, each chunk one write."""
    edges = [0, *cuts, len(body)]
    return [b"%x\r\n%s\r\n" % (b - a, body[a:b]) for a, b in itertools.pairwise(edges) if b > a]


def sse_handler(writes: list[bytes], pause: float = 0.0) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for piece in writes:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return handle


async def messages(client: httpx.AsyncClient, url: str) -> list[tuple[str, bytes]]:
    parser = SSEDecoder()
    got: list[tuple[str, bytes]] = []
    async with client.stream("POST", url, content=b"{}") as response:
        assert response.status_code == 200
        async for raw in response.aiter_raw():
            got += parser.feed_raw(raw)
    return got


BODY = (
    b": a comment\r\n\r\n"
    b'data: {"choices":[{"delta":{"content":"Hi"}}]}\r\n\r\n'
    b"event: note\ndata: line one\ndata: line two\n\n"
    b'data: {"choices":[{"delta":{"content":" there"}}]}\n\n'
    b"data: {not json\n\n"
    b"data: [DONE]\n\n"
)


async def test_same_messages_as_httpx_default_transport_at_every_split() -> None:
    expected = SSEDecoder().feed_raw(BODY)
    assert [name for name, _, _ in expected] == ["", "note", "", "", ""]
    for cut in range(1, len(BODY)):
        # One HTTP chunk cut at ``cut``, and the chunk header written apart from its data
        # (a TCP read may end anywhere in the framing, too).
        frames = chunked(BODY, [cut])
        writes = [frames[0][:3], frames[0][3:], *frames[1:]]
        async with upstream(sse_handler(writes)) as up:
            url = f"http://127.0.0.1:{up.port}/v1/chat/completions"
            async with fast_client() as fast:
                got = await messages(fast, url)
            async with httpx.AsyncClient() as slow:
                reference = await messages(slow, url)
        assert got == reference == expected, cut


async def test_byte_by_byte_chunks_and_the_decoders_errors_survive_the_fast_path() -> None:
    writes = chunked(BODY, list(range(1, len(BODY))))  # one HTTP chunk per byte
    async with upstream(sse_handler(writes)) as up, fast_client() as client:
        got = await messages(client, f"http://127.0.0.1:{up.port}/")
    assert got == SSEDecoder().feed_raw(BODY)
    decoder = ChatDecoder()
    texts = [e.text for _, data, _ in (got[0], got[2]) for e in decoder.decode("", data)]  # type: ignore[attr-defined]
    assert texts == ["Hi", " there"]
    with pytest.raises(BackendProtocolError):
        decoder.decode(*got[3][:2])  # the malformed chunk: a typed error, as before


def relay_client() -> httpx.AsyncClient:
    """As the gateway's: no read timeout (the relay keeps its own deadlines)."""
    return httpx.AsyncClient(
        transport=UpstreamTransport(limits=LIMITS), timeout=httpx.Timeout(5.0, read=None)
    )


async def direct_messages(client: httpx.AsyncClient, url: str) -> list[tuple[str, bytes]]:
    """As ``UpstreamCall`` reads: the first piece by iterating, the rest directly."""
    parser = SSEDecoder()
    async with client.stream("POST", url, content=b"{}") as response:
        chunks = response.aiter_raw()
        got = parser.feed_raw(await anext(chunks))
        body = direct_body(response)
        assert body is not None
        while (raw := body.take()) != b"":
            if raw is None:
                await body.waiter()
            else:
                got += parser.feed_raw(raw)
        await chunks.aclose()  # type: ignore[attr-defined]
    return got


async def test_direct_body_reads_give_the_same_messages_and_release_the_connection() -> None:
    expected = SSEDecoder().feed_raw(BODY)
    for cut in range(1, len(BODY), 7):
        frames = chunked(BODY, [cut])
        writes = [frames[0][:3], frames[0][3:], *frames[1:]]
        async with upstream(sse_handler(writes, 0.001)) as up, relay_client() as client:
            url = f"http://127.0.0.1:{up.port}/"
            assert await direct_messages(client, url) == expected, cut
            assert await direct_messages(client, url) == expected, cut
            assert up.connections == 1  # complete: back to the pool, reused
    async with (
        fast_client() as client,
        upstream(sse_handler([b"5\r\ndata:\r\n"])) as up,
        client.stream("POST", f"http://127.0.0.1:{up.port}/") as response,
    ):
        assert direct_body(response) is None  # a read timeout: read by iterating


async def test_direct_body_closed_mid_answer_closes_the_connection_and_errors_raise() -> None:
    async with (
        upstream(
            sse_handler(chunked(b"data: x\n\n" * 50, [9 * i for i in range(1, 50)]), 0.01)
        ) as up,
        relay_client() as client,
    ):
        url = f"http://127.0.0.1:{up.port}/"
        async with client.stream("POST", url, content=b"{}") as response:
            chunks = response.aiter_raw()
            await anext(chunks)
            body = direct_body(response)
            assert body is not None
            waiting = asyncio.ensure_future(body.waiter())
            await asyncio.sleep(0)
            waiting.cancel()  # Stop while the relay waits: it closes the body
            body.close()
            await chunks.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        assert up.closed_by_client == 1  # the upstream saw the client leave at once
        assert len(await direct_messages(client, url)) == 50
        assert up.connections == 2

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(chunked(b"data: a\n\n", [])[0])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with upstream(cut) as up, relay_client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await direct_messages(client, f"http://127.0.0.1:{up.port}/")


async def test_bad_chunk_framing_is_a_remote_protocol_error() -> None:
    async with upstream(sse_handler([b"zz\r\nnot hex\r\n"])) as up, fast_client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await messages(client, f"http://127.0.0.1:{up.port}/")


async def test_keep_alive_reuses_one_connection_and_early_close_closes_it() -> None:
    async with upstream(
        sse_handler(chunked(b"data: x\n\n" * 50, [9 * i for i in range(1, 50)]), 0.002)
    ) as up:
        url = f"http://127.0.0.1:{up.port}/"
        async with fast_client() as client:
            for _ in range(3):
                assert len(await messages(client, url)) == 50
            assert up.connections == 1  # pooled
            async with client.stream("POST", url, content=b"{}") as response:
                async for _ in response.aiter_raw():
                    break  # leave mid-body
            await asyncio.sleep(0.2)
            assert up.closed_by_client == 1  # the upstream saw the client leave
            assert len(await messages(client, url)) == 50
            assert up.connections == 2  # the closed one was not reused


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive was allowed, but the server leaves anyway

    async with upstream(answer_then_close) as up, fast_client() as client:
        for _ in range(3):
            response = await client.post(f"http://127.0.0.1:{up.port}/", content=b"{}")
            assert response.content == b"ok"
            await asyncio.sleep(0.05)
    assert up.connections == 3


async def test_bytes_after_a_response_make_its_connection_unusable() -> None:
    async def extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokGARBAGE")
        await writer.drain()

    async with upstream(extra) as up, fast_client() as client:
        for _ in range(2):
            response = await client.post(f"http://127.0.0.1:{up.port}/", content=b"{}")
            assert response.content == b"ok"
            await asyncio.sleep(0.05)
    assert up.connections == 2


async def test_pool_limit_waits_then_times_out() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with upstream(slow) as up:
        url = f"http://127.0.0.1:{up.port}/"
        async with httpx.AsyncClient(transport=UpstreamTransport(limits=limits)) as client:
            first = asyncio.ensure_future(client.post(url, content=b"{}"))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await client.post(url, content=b"{}", timeout=httpx.Timeout(5.0, pool=0.1))
            waited = asyncio.ensure_future(client.post(url, content=b"{}"))
            assert (await first).content == b"ok"
            assert (await waited).content == b"ok"  # got the connection when it came back
    assert up.connections == 1


async def test_refused_cut_short_and_close_delimited_bodies() -> None:
    async with upstream(sse_handler([])) as up:
        port = up.port
    async with fast_client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{port}/", content=b"{}")

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(chunked(b"data: a\n\n", [])[0])
        await writer.drain()
        writer.transport.abort()

    async with upstream(cut) as up, fast_client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await messages(client, f"http://127.0.0.1:{up.port}/")

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: a\n\n")
        await writer.drain()
        writer.close()

    async with upstream(until_close) as up, fast_client() as client:
        assert await messages(client, f"http://127.0.0.1:{up.port}/") == [("", b"a", "")]


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (key, cert)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


async def test_tls_upstream(tls_cert: tuple[Path, Path]) -> None:
    key, cert = tls_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    writes = chunked(BODY, [10, 50])
    async with upstream(sse_handler(writes), ssl_context=server_ctx) as up:
        url = f"https://127.0.0.1:{up.port}/"
        trusted = ssl.create_default_context(cafile=str(cert))
        transport = UpstreamTransport(limits=LIMITS, ssl_context=trusted)
        async with httpx.AsyncClient(transport=transport) as client:
            assert await messages(client, url) == SSEDecoder().feed_raw(BODY)
            assert await messages(client, url) == SSEDecoder().feed_raw(BODY)
        assert up.connections == 1
        async with fast_client() as client:
            with pytest.raises(httpx.ConnectError):  # not trusted by the default CAs
                await messages(client, url)


def test_loop_histogram_exposes_what_prometheus_histogram_does() -> None:
    buckets = (0.001, 0.0025, 0.005, 0.01)
    fast = LoopHistogram("fast_seconds", "doc", buckets, CollectorRegistry())
    slow = Histogram("slow_seconds", "doc", buckets=buckets, registry=CollectorRegistry())
    for value in (0.0005, 0.001, 0.0011, 0.0025, 0.004, 0.01, 0.02, 3.0):
        fast.observe(value)
        slow.observe(value)

    def samples(metric: LoopHistogram | Histogram, name: str) -> dict[tuple[str, str], float]:
        return {
            (s.name.replace(name, ""), s.labels.get("le", "")): s.value
            for s in metric.collect()[0].samples
            if not s.name.endswith("_created")
        }

    assert samples(fast, "fast_seconds") == samples(slow, "slow_seconds")
