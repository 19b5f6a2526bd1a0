"""tokenwire.Client / AsyncClient against real servers: the embedded model over real sockets.

Connection cuts are injected by ``CuttingProxy``, a TCP proxy on a free loopback port that
closes the client's side of a connection after a chosen number of response bytes: the client
sees what a dropped network gives it. The proxy keeps draining the server's side, as a
half-open connection (a NAT or mobile hand-over dropping the path) does, so the shared server
(disconnect grace 0) keeps generating and the stream stays resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import tokenwire
from tokenwire.client import AsyncClient, Client, RetryPolicy
from tokenwire.errors import InvalidRequest, ModelNotFound, StreamInterrupted
from tokenwire.events import (
    Event,
    GuardTriggered,
    Progress,
    StreamCancelled,
    StreamCompleted,
    StreamStarted,
    TextDelta,
    Usage,
)

from .conftest import RunningServer, tokenwire_server
from .llama_peer import llama_cpp_server

PROMPT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
GREEDY = {"temperature": 0, "seed": 11, "max_tokens": 32}


# -- fault injection -------------------------------------------------------------------------


@dataclass
class ProxiedConnection:
    opened_at: float
    request_head: bytearray = field(default_factory=bytearray)
    downstream_bytes: int = 0
    cut_at: float | None = None
    client_closed_at: float | None = None

    def header(self, name: str) -> str | None:
        for line in bytes(self.request_head).split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode()
        return None

    @property
    def request_line(self) -> str:
        return bytes(self.request_head).split(b"\r\n", 1)[0].decode()


class CuttingProxy:
    """Forwards 127.0.0.1:port to the target; connection i is cut after ``cuts[i]`` bytes
    of response (None: never; 0: at once, before any byte), or stalls there (``stall``)."""

    def __init__(
        self, target_port: int, cuts: list[int | None] | None = None, *, stall: bool = False
    ) -> None:
        self.target_port = target_port
        self.cuts = list(cuts or [])
        #: At the cut, go silent instead of closing: the client sees a stalled stream.
        self.stall = stall
        self.connections: list[ProxiedConnection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            index = len(self.connections)
            record = ProxiedConnection(opened_at=time.monotonic())
            self.connections.append(record)
            limit = self.cuts[index] if index < len(self.cuts) else None
            threading.Thread(target=self._serve, args=(client, record, limit), daemon=True).start()

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _serve(self, client: socket.socket, record: ProxiedConnection, limit: int | None) -> None:
        if limit == 0:
            record.cut_at = time.monotonic()
            self._shut(client)
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump_up() -> None:
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    if len(record.request_head) < 8192:
                        record.request_head += data
                    upstream.sendall(data)
            except OSError:
                pass
            if record.client_closed_at is None:
                record.client_closed_at = time.monotonic()
            if record.cut_at is None:  # the client left by itself: pass that on
                self._shut(upstream)

        threading.Thread(target=pump_up, daemon=True).start()
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if record.cut_at is not None:
                    continue  # half-open: the server's side is drained, the client is gone
                if limit is not None and record.downstream_bytes + len(data) >= limit:
                    client.sendall(data[: limit - record.downstream_bytes])
                    record.downstream_bytes = limit
                    record.cut_at = time.monotonic()
                    if not self.stall:
                        self._shut(client)
                    continue
                client.sendall(data)
                record.downstream_bytes += len(data)
        except OSError:
            pass
        self._shut(client, upstream)


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def server_side_end(server: RunningServer, stream_id: str | None) -> Event:
    """How the server ended a stream: replay its journal to the terminal event."""
    assert stream_id
    with Client(server.url) as client:
        return list(client.streams.resume(stream_id))[-1]


def released_and_stopped(server: RunningServer, proxy: CuttingProxy, stream_id: str | None) -> None:
    """The client closed its socket, and (disconnect grace 0) the server stopped generating."""
    assert wait_for(lambda: proxy.connections[0].client_closed_at is not None, 5)
    end = server_side_end(server, stream_id)
    assert isinstance(end, StreamCancelled) and end.reason == "disconnect"


def assert_well_formed(events: list[Event]) -> None:
    """One stream.started first, one terminal last, native seqs 0..n without gap or repeat."""
    assert isinstance(events[0], StreamStarted)
    assert events[-1].terminal and sum(e.terminal for e in events) == 1
    assert [e.seq for e in events] == list(range(len(events)))


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_text(server: RunningServer) -> str:
    """The unbroken stream's text (greedy decoding with a seed: the same on every run)."""
    with Client(server.url) as client:
        return client.chat.create(messages=PROMPT, **GREEDY).text


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server: a foreign peer (no X-Stream-Id)."""
    with llama_cpp_server() as url:
        yield url


# -- the happy path --------------------------------------------------------------------------


def test_exported_from_the_package() -> None:
    assert tokenwire.Client is Client and tokenwire.AsyncClient is AsyncClient


def test_stream_yields_typed_events_in_order(server: RunningServer) -> None:
    with Client(server.url) as client:
        with client.chat.stream(messages=PROMPT, **GREEDY) as stream:
            events = list(stream)
            assert stream.id is not None and stream.resumable
        result = stream.final()
    assert_well_formed(events)
    kinds = [type(e) for e in events]
    assert kinds.index(Progress) < kinds.index(TextDelta) < kinds.index(Usage)
    assert isinstance(events[-1], StreamCompleted)
    assert result.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert result.finish_reason == "length" and result.usage is not None
    assert result.usage.completion_tokens == GREEDY["max_tokens"]
    metrics = result.metrics
    assert metrics.ttft_ms is not None and metrics.ttft_ms > 0
    assert metrics.itl_p50_ms is not None and metrics.itl_p99_ms is not None
    assert metrics.itl_p50_ms <= metrics.itl_p99_ms
    assert metrics.tokens_per_second is not None and metrics.tokens_per_second > 0
    assert metrics.e2e_ms is not None and metrics.e2e_ms >= metrics.ttft_ms


def test_text_stream_arrives_piece_by_piece(server: RunningServer) -> None:
    arrivals: list[float] = []
    pieces: list[str] = []
    with Client(server.url) as client, client.chat.stream(messages=PROMPT, **GREEDY) as stream:
        for piece in stream.text_stream():
            arrivals.append(time.perf_counter())
            pieces.append(piece)
    assert len(pieces) >= 20
    # Streamed, not buffered: the pieces arrive spread over the generation.
    assert arrivals[-1] - arrivals[0] > 0.25 * (arrivals[-1] - stream.metrics.started_at)
    assert "".join(pieces) == stream.final().text


@pytest.mark.anyio
async def test_async_client_same_shape(server: RunningServer, reference_text: str) -> None:
    async with AsyncClient(server.url) as client:
        async with client.chat.stream(messages=PROMPT, **GREEDY) as stream:
            pieces = [piece async for piece in stream.text_stream()]
        result = await stream.final()
    assert "".join(pieces) == result.text == reference_text
    assert result.metrics.ttft_ms is not None


def test_a_guard_reaches_both_clients_as_a_typed_event(reference_text: str) -> None:
    """A real guard on the embedded model: the client yields ``GuardTriggered`` (it used to
    drop the event as unknown) right before the terminal event, and the result names it."""
    word = next(m for m in re.finditer(r"[A-Za-z]{4,}", reference_text) if m.start() >= 20).group()
    position = reference_text.index(word)
    pattern = re.escape(word)  # fires at its first occurrence, even inside a longer word
    with tokenwire_server("--guard", f"early-word={pattern}", "--disconnect-grace", "0") as guarded:
        with Client(guarded.url) as client, client.chat.stream(messages=PROMPT, **GREEDY) as s:
            events = list(s)
        result = s.final()

        async def read_async() -> list[Event]:
            async with AsyncClient(guarded.url) as client:
                return [event async for event in client.chat.stream(messages=PROMPT, **GREEDY)]

        async_events = asyncio.run(read_async())
    assert_well_formed(events)
    fired = [e for e in events if isinstance(e, GuardTriggered)]
    assert len(fired) == 1 and events[-2] is fired[0]
    assert (fired[0].guard, fired[0].match, fired[0].position) == ("early-word", word, position)
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "content_filter"
    assert result.finish_reason == "content_filter" and result.guard == fired[0]
    # Generation stopped at the token that completed the match: what went out before it
    # stays (a guard does not redact), nothing after the match's start followed.
    assert reference_text.startswith(result.text)
    assert position <= len(result.text) < position + len(word)
    assert [type(e) for e in async_events] == [type(e) for e in events]
    assert tokenwire.GuardTriggered is GuardTriggered


def test_openai_protocol_against_tokenwire(server: RunningServer, reference_text: str) -> None:
    with (
        Client(server.url) as client,
        client.chat.stream(messages=PROMPT, protocol="openai", **GREEDY) as stream,
    ):
        events = list(stream)
    assert isinstance(events[0], StreamStarted) and isinstance(events[-1], StreamCompleted)
    assert stream.resumable  # tokenwire names every stream, whatever the protocol
    result = stream.final()
    assert result.text == reference_text
    assert result.usage is not None and result.usage.completion_tokens == GREEDY["max_tokens"]


def test_anthropic_protocol_against_tokenwire(server: RunningServer, reference_text: str) -> None:
    with (
        Client(server.url) as client,
        client.chat.stream(messages=PROMPT, protocol="anthropic", **GREEDY) as stream,
    ):
        events = list(stream)
    assert isinstance(events[0], StreamStarted) and isinstance(events[-1], StreamCompleted)
    result = stream.final()
    assert result.text == reference_text
    assert result.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == GREEDY["max_tokens"]


def test_responses_protocol_resumes_through_a_cut_and_stops(
    server: RunningServer, reference_text: str
) -> None:
    with (
        CuttingProxy(server.port, cuts=[3500]) as proxy,
        Client(proxy.url, protocol="responses") as client,
        client.chat.stream(messages=PROMPT, **GREEDY) as stream,
    ):
        events = list(stream)
    assert len(proxy.connections) == 2  # cut once, resumed with the Responses cursor
    resumed_after = int(proxy.connections[1].header("last-event-id") or -1)
    before = [e for e in events if isinstance(e, TextDelta) and e.seq <= resumed_after]
    assert before and len(before) < GREEDY["max_tokens"], "the cut must fall mid-text"
    assert isinstance(events[0], StreamStarted) and isinstance(events[-1], StreamCompleted)
    result = stream.final()
    assert result.text == reference_text and result.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == GREEDY["max_tokens"]
    with Client(server.url, protocol="responses") as client:
        with client.chat.stream(messages=PROMPT, max_tokens=1500) as stream:
            for event in stream:
                if isinstance(event, TextDelta):
                    stream.cancel()
        assert isinstance(stream.terminal, StreamCancelled) and stream.final().cancelled


def test_request_errors_are_typed(server: RunningServer) -> None:
    with Client(server.url) as client:
        assert "default" in client.models()
        with pytest.raises(ModelNotFound), client.chat.stream(model="no-such", messages=PROMPT):
            pass
        with pytest.raises(InvalidRequest) as info:
            client.chat.create(messages=PROMPT, temperature=7)
    assert "temperature" in str(info.value)


PERSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_partial_objects_grow_into_the_parsed_result(server: RunningServer) -> None:
    messages = [{"role": "user", "content": "Invent a person: give a name and an age."}]
    with (
        Client(server.url) as client,
        client.chat.stream(
            messages=messages, response_format=PERSON, max_tokens=60, temperature=0
        ) as stream,
    ):
        partials = list(stream.partial_objects())
    result = stream.final()
    assert len(partials) >= 3
    assert isinstance(result.parsed, dict) and result.parsed == partials[-1]
    assert isinstance(result.parsed["name"], str) and isinstance(result.parsed["age"], int)
    assert result.parsed == json.loads(result.text)
    # Progressive: the name is seen growing before the object is whole.
    names = [p.get("name") for p in partials if isinstance(p, dict) and p.get("name")]
    assert len(set(names)) >= 2 or len(partials) > len(names)


@pytest.mark.parametrize("protocol", ["native", "openai", "anthropic", "responses"])
def test_tool_calls_in_every_protocol(server: RunningServer, protocol: str) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with Client(server.url, protocol=protocol) as client:  # type: ignore[arg-type]
        result = client.chat.create(
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=80,
            temperature=0,
        )
    assert result.finish_reason == "tool_calls"
    assert [call.name for call in result.tool_calls] == ["get_weather"]
    assert "city" in json.loads(result.tool_calls[0].arguments)


# -- resume ----------------------------------------------------------------------------------


def test_resumes_through_a_cut_with_the_same_text(
    server: RunningServer, reference_text: str
) -> None:
    with (
        CuttingProxy(server.port, cuts=[1000]) as proxy,
        Client(proxy.url) as client,
        client.chat.stream(messages=PROMPT, **GREEDY) as stream,
    ):
        events = list(stream)
    assert len(proxy.connections) == 2
    first, second = proxy.connections
    assert first.cut_at is not None
    before_cut = [e for e in events if e.seq <= int(second.header("last-event-id") or -1)]
    text_before = "".join(e.text for e in before_cut if isinstance(e, TextDelta))
    assert 0 < len(text_before) < len(reference_text), "the cut must fall mid-text"
    # The resume is a GET of the same stream after the last event the client had.
    assert second.request_line.startswith(f"GET /v1/streams/{stream.id} ")
    assert int(second.header("last-event-id") or -1) == before_cut[-1].seq
    # ... after the server's retry: 1000 ms.
    assert second.opened_at - first.cut_at >= 0.95
    assert_well_formed(events)
    assert stream.final().text == reference_text
    assert stream.metrics.reconnects == 1


@pytest.mark.anyio
async def test_async_openai_protocol_resumes_through_a_cut(
    server: RunningServer, reference_text: str
) -> None:
    with CuttingProxy(server.port, cuts=[900]) as proxy:
        async with (
            AsyncClient(proxy.url, protocol="openai") as client,
            client.chat.stream(messages=PROMPT, **GREEDY) as stream,
        ):
            events = [event async for event in stream]
    assert len(proxy.connections) == 2
    assert proxy.connections[1].header("last-event-id") is not None
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(texts) == reference_text
    assert isinstance(events[-1], StreamCompleted)
    assert sum(isinstance(e, StreamStarted) for e in events) == 1


def test_a_stalled_stream_resumes_after_the_idle_timeout(
    server: RunningServer, reference_text: str
) -> None:
    """No bytes at all (not even heartbeats) for ``timeout`` seconds: treated as a drop."""
    with (
        CuttingProxy(server.port, cuts=[1000], stall=True) as proxy,
        Client(proxy.url, timeout=2.0) as client,
        client.chat.stream(messages=PROMPT, **GREEDY) as stream,
    ):
        events = list(stream)
    assert len(proxy.connections) == 2
    first, second = proxy.connections
    assert first.cut_at is not None and second.opened_at - first.cut_at >= 2.0
    assert_well_formed(events)
    assert stream.final().text == reference_text


def test_stream_interrupted_once_retries_are_spent(
    server: RunningServer, reference_text: str
) -> None:
    received: list[str] = []
    with CuttingProxy(server.port, cuts=[1000, 0, 0, 0]) as proxy:
        client = Client(proxy.url, max_retries=2, max_backoff=1.5)
        with (
            pytest.raises(StreamInterrupted) as info,
            client.chat.stream(messages=PROMPT, **GREEDY) as stream,
        ):
            for piece in stream.text_stream():
                received.append(piece)
        client.close()
    error = info.value
    # 1 stream + 2 resume attempts, then give up.
    assert len(proxy.connections) == 3
    assert error.partial_text == "".join(received)
    assert error.partial_text and reference_text.startswith(error.partial_text)
    assert error.last_event_id >= 2
    # Capped exponential backoff from the server's retry (1 s): 1.0 s, then min(2.0, 1.5).
    cut = proxy.connections[0].cut_at
    assert cut is not None
    assert proxy.connections[1].opened_at - cut >= 0.95
    assert proxy.connections[2].opened_at - proxy.connections[1].opened_at >= 1.45


def test_a_foreign_server_cannot_resume(llama_server: str) -> None:
    port = int(llama_server.rsplit(":", 1)[1])
    with (
        CuttingProxy(port, cuts=[1200]) as proxy,
        Client(proxy.url, protocol="openai") as client,
        pytest.raises(StreamInterrupted) as info,
        client.chat.stream(messages=PROMPT, max_tokens=200) as stream,
    ):
        for _ in stream:
            pass
    assert not stream.resumable
    assert len(proxy.connections) == 1  # no id to resume with: no pointless retries
    assert info.value.partial_text


def test_retry_policy_schedule() -> None:
    policy = RetryPolicy(max_retries=5, max_backoff=5.0)
    assert [policy.delay(n, 1000) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay(1, 250) == 0.25
    assert policy.delay(1, None) == policy.default_retry


# -- Stop ------------------------------------------------------------------------------------


def test_cancel_stops_the_servers_decoding(server: RunningServer) -> None:
    with Client(server.url) as client:
        with client.chat.stream(messages=PROMPT, max_tokens=1500) as stream:
            seen = 0
            after_cancel = 0
            for event in stream:
                if isinstance(event, TextDelta):
                    seen += 1
                    if seen == 5:
                        stream.cancel()
                    elif seen > 5:
                        after_cancel += 1
            terminal = stream.terminal
        result = stream.final()
        assert isinstance(terminal, StreamCancelled) and terminal.reason == "stop"
        assert result.cancelled and result.text
        assert after_cancel < 30, f"{after_cancel} tokens after Stop"
        # The journal agrees: replaying the stream shows nothing generated after the Stop.
        replay = list(client.streams.resume(stream.id or ""))
    replayed = [e for e in replay if isinstance(e, TextDelta)]
    assert len(replayed) == seen
    assert isinstance(replay[-1], StreamCancelled)


def test_cancel_on_a_foreign_server_drops_the_connection(llama_server: str) -> None:
    events: list[Event] = []
    with (
        Client(llama_server, protocol="openai") as client,
        client.chat.stream(messages=PROMPT, max_tokens=300) as stream,
    ):
        for event in stream:
            events.append(event)
            if sum(isinstance(e, TextDelta) for e in events) == 3:
                stream.cancel()
    assert isinstance(events[-1], StreamCancelled)
    assert sum(isinstance(e, TextDelta) for e in events) <= 4
    assert stream.final().cancelled


@pytest.mark.anyio
async def test_async_cancel_on_a_foreign_server(llama_server: str) -> None:
    events: list[Event] = []
    async with (
        AsyncClient(llama_server, protocol="openai") as client,
        client.chat.stream(messages=PROMPT, max_tokens=300) as stream,
    ):
        async for event in stream:
            events.append(event)
            if sum(isinstance(e, TextDelta) for e in events) == 3:
                await stream.cancel()
    assert isinstance(events[-1], StreamCancelled)
    assert (await stream.final()).cancelled


def test_reads_a_foreign_openai_server(llama_server: str) -> None:
    with (
        Client(llama_server, protocol="openai") as client,
        client.chat.stream(messages=PROMPT, max_tokens=12) as stream,
    ):
        events = list(stream)
    assert isinstance(events[0], StreamStarted)
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "length"
    assert sum(isinstance(e, TextDelta) for e in events) >= 5
    assert stream.final().text.strip()
    assert stream.metrics.ttft_ms is not None


# -- connections are released ----------------------------------------------------------------


def test_connection_released_on_break_inside_with(server: RunningServer) -> None:
    with CuttingProxy(server.port) as proxy, Client(proxy.url) as client:
        with client.chat.stream(messages=PROMPT, max_tokens=400) as stream:
            for event in stream:
                if isinstance(event, TextDelta):
                    break
        released_and_stopped(server, proxy, stream.id)


def test_connection_released_on_break_without_with(server: RunningServer) -> None:
    with CuttingProxy(server.port) as proxy, Client(proxy.url) as client:
        stream = client.chat.stream(messages=PROMPT, max_tokens=400)
        for event in stream:
            if isinstance(event, TextDelta):
                break
        released_and_stopped(server, proxy, stream.id)


def test_connection_released_on_exception(server: RunningServer) -> None:
    with CuttingProxy(server.port) as proxy, Client(proxy.url) as client:
        with pytest.raises(KeyError), client.chat.stream(messages=PROMPT, max_tokens=400) as s:
            for _ in s.text_stream():
                raise KeyError("user code failed")
        released_and_stopped(server, proxy, s.id)


def test_final_after_an_early_close_is_interrupted(server: RunningServer) -> None:
    with Client(server.url) as client:
        stream = client.chat.stream(messages=PROMPT, max_tokens=400)
        pieces = []
        for piece in stream.text_stream():  # no ``with``: the break closes the stream
            pieces.append(piece)
            if len(pieces) == 3:
                break
        with pytest.raises(StreamInterrupted) as info:
            stream.final()
    assert info.value.partial_text == "".join(pieces)


@pytest.mark.anyio
async def test_async_connection_released_on_break(server: RunningServer) -> None:
    with CuttingProxy(server.port) as proxy:
        async with (
            AsyncClient(proxy.url) as client,
            client.chat.stream(messages=PROMPT, max_tokens=400) as stream,
        ):
            async for event in stream:
                if isinstance(event, TextDelta):
                    break
        await asyncio.to_thread(released_and_stopped, server, proxy, stream.id)
