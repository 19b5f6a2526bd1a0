"""server/http.py writes a response's head together with its first body bytes: one write
system call instead of two (on loopback each write also runs the client's receive; it was
one of the three writes on the gateway's first-token path, benchmarks/ttft_breakdown.py).

A real uvicorn with tokenwire's protocol; each connection's transport is wrapped so the test
sees every write the server makes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tokenwire.server import http

from .scripted import ScriptedBackend, serve_app_in_thread

WRITES: list[bytes] = []
LOCK = threading.Lock()


class _Counting:
    """The connection's transport, with every write recorded."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        with LOCK:
            WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    made = http.HttpProtocol.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        made(self, _Counting(transport))

    monkeypatch.setattr(http.HttpProtocol, "connection_made", connection_made)
    backend = ScriptedBackend(pieces=["Hello", " world"], gap=0.05)
    with serve_app_in_thread(backend, heartbeat=30.0) as url:
        yield url.rsplit(":", 1)[1]


def exchange(port: str, request: bytes) -> bytes:
    WRITES.clear()
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.timeout(60)
def test_a_json_response_is_one_write(server: str) -> None:
    received = exchange(server, b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"}")
    assert len(WRITES) == 1, WRITES
    assert WRITES[0] == received


@pytest.mark.timeout(60)
def test_a_head_request_still_gets_its_head(server: str) -> None:
    received = exchange(server, b"HEAD /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 ") and body == b""
    assert len(WRITES) == 1, WRITES


@pytest.mark.timeout(60)
def test_an_event_stream_head_goes_with_its_first_bytes(server: str) -> None:
    body = b'{"model": "scripted", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    received = exchange(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body),
    )
    assert b"Hello" in received and b" world" in received and b"[DONE]" in received
    first = WRITES[0]
    # The head and the stream's first body bytes (a comment or the first frame) in one write.
    assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
    _, _, rest = first.partition(b"\r\n\r\n")
    assert rest, WRITES[:3]
    # The first frame was ready with the head (the backend's first event started the stream):
    # it goes in the same write (``DirectWrite.hold``), after the opening comment.
    assert rest.index(b": stream open") < rest.index(b"data: "), WRITES[:3]
    # Nothing was lost or reordered: the writes are exactly what the client read.
    assert b"".join(WRITES) == received
