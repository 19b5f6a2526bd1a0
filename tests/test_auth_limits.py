"""API keys, stream ownership and limits against a real ``tokenwire serve`` (embedded model).

Two servers: ``keyed`` (two keys, body/max_tokens/concurrency limits) and ``limited`` (rate
limit and a small per-stream journal limit). Unit tests cover the pieces that need a clock
or many samples (rate bucket, id entropy, memory journal byte bound).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tokenwire.cli.serve import exposure_warning
from tokenwire.config import Settings
from tokenwire.errors import Overloaded
from tokenwire.events import StreamCompleted, StreamStarted, TextDelta
from tokenwire.journal.base import StreamMeta
from tokenwire.journal.memory import MemoryJournal
from tokenwire.server.auth import ApiKeys, RateLimiter, owner_of, presented_key
from tokenwire.streams import new_stream_id

from .conftest import RunningServer, tokenwire_server
from .gateway_support import iter_sse

#: Generous timeouts: the machine is shared and the model decodes on 2 cores.
HTTP = httpx.Client(timeout=60)

KEY_A = "tw-key-alpha-0123456789"
KEY_B = "tw-key-bravo-9876543210"


@pytest.fixture(scope="module")
def keyed() -> Iterator[RunningServer]:
    with tokenwire_server(
        "--api-keys", f"{KEY_A},{KEY_B}",
        "--max-body-bytes", "65536",
        "--max-tokens-limit", "48",
        "--max-streams-per-key", "2",
        "--disconnect-grace", "30",
        "--heartbeat", "1",
    ) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def limited() -> Iterator[RunningServer]:
    # Keys via the environment (comma-separated), as TOKENWIRE_API_KEYS documents.
    with tokenwire_server(
        "--rate-limit", "1",
        "--rate-burst", "2",
        "--max-stream-bytes", "1500",
        "--disconnect-grace", "30",
        "--metrics-auth",
        env={"TOKENWIRE_API_KEYS": "r1, r2,r3"},
    ) as running:  # fmt: skip
        yield running


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": content}], **extra}


def anthropic_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "default",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/streams"),
        ("GET", "/v1/streams/abc"),
        ("POST", "/v1/streams/abc/cancel"),
        ("GET", "/v1/models"),
    ],
)
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"x-api-key": "wrong"}])
def test_missing_or_wrong_key_is_401_in_openai_shape(
    keyed: RunningServer, method: str, path: str, headers: dict[str, str]
) -> None:
    response = HTTP.request(method, keyed.url + path, json=chat(), headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == ("missing_api_key" if not headers else "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_missing_key_on_messages_is_401_in_anthropic_shape(keyed: RunningServer) -> None:
    response = HTTP.post(f"{keyed.url}/v1/messages", json=anthropic_body())
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    # The official client raises its own typed error for it.
    client = anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(**anthropic_body())


def test_open_paths_need_no_key(keyed: RunningServer) -> None:
    for path in ("/healthz", "/", "/openapi.json", "/metrics"):  # /metrics: metrics_auth off
        assert HTTP.get(keyed.url + path).status_code == 200, path


def test_both_header_forms_and_the_official_clients_work(keyed: RunningServer) -> None:
    for headers in (bearer(KEY_A), {"x-api-key": KEY_B}):
        assert HTTP.get(f"{keyed.url}/v1/models", headers=headers).status_code == 200
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY_A, max_retries=0)
    chunks = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=6
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(pieces)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()
    message = anthropic.Anthropic(base_url=keyed.url, api_key=KEY_B, max_retries=0)
    assert message.messages.create(**anthropic_body()).content


def test_websocket_handshake_without_key_is_401(keyed: RunningServer) -> None:
    async def main() -> None:
        ws_url = keyed.url.replace("http", "ws") + "/v1/ws"
        with pytest.raises(InvalidStatus) as raised:
            async with websockets.connect(ws_url):
                pass
        assert raised.value.response.status_code == 401
        assert json.loads(raised.value.response.body or b"{}")["error"]["type"] == (
            "authentication_error"
        )
        async with websockets.connect(ws_url, additional_headers=bearer(KEY_A)) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv()) == {"type": "pong"}

    asyncio.run(main())


# -- ownership ---------------------------------------------------------------------------------


def start_native(server: RunningServer, key: str, **extra: Any) -> tuple[str, list[dict]]:
    with httpx.stream(
        "POST", f"{server.url}/v1/streams", json=chat(**extra), headers=bearer(key), timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        events = [sse.json() for sse in iter_sse(response)]
        return response.headers["x-stream-id"], events


def test_another_keys_stream_is_indistinguishable_from_an_unknown_one(
    keyed: RunningServer,
) -> None:
    stream_id, events = start_native(keyed, KEY_A, max_tokens=8)
    assert events[-1]["type"] == "stream.completed"

    def resume(sid: str, key: str) -> httpx.Response:
        return HTTP.get(f"{keyed.url}/v1/streams/{sid}", headers=bearer(key), timeout=30)

    mine = resume(stream_id, KEY_A)
    assert mine.status_code == 200 and "stream.completed" in mine.text
    theirs = resume(stream_id, KEY_B)
    unknown = resume(new_stream_id(), KEY_B)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["type"] == unknown.json()["error"]["type"] == "not_found_error"
    assert stream_id in theirs.json()["error"]["message"]  # same text, only the id differs
    cancel = HTTP.post(f"{keyed.url}/v1/streams/{stream_id}/cancel", headers=bearer(KEY_B))
    assert cancel.status_code == 404


def test_another_key_cannot_cancel_or_resume_over_websocket(keyed: RunningServer) -> None:
    async def main() -> None:
        ws_url = keyed.url.replace("http", "ws") + "/v1/ws"
        async with (
            websockets.connect(ws_url, additional_headers=bearer(KEY_A)) as a,
            websockets.connect(ws_url, additional_headers=bearer(KEY_B)) as b,
        ):
            await a.send(json.dumps({"type": "start", "request": chat(max_tokens=40)}))
            started = json.loads(await a.recv())
            assert started["type"] == "stream.started"
            stream_id = started["stream_id"]
            for kind in ("cancel", "resume"):
                await b.send(json.dumps({"type": kind, "stream_id": stream_id}))
                reply = json.loads(await asyncio.wait_for(b.recv(), 10))
                assert reply["type"] == "error", reply
                assert reply["error"]["type"] == "not_found_error"
            # A's stream went on untouched: it completes, never cancelled.
            while True:
                message = json.loads(await asyncio.wait_for(a.recv(), 30))
                if message["type"].startswith("stream.") and message["type"] != "stream.started":
                    assert message["type"] == "stream.completed"
                    break

    asyncio.run(main())


def test_stream_owner_is_a_hash_of_the_key_never_the_key() -> None:
    keys = ApiKeys(f"{KEY_A},{KEY_B}")
    owner = keys.authenticate(KEY_A)
    assert owner == owner_of(KEY_A) != owner_of(KEY_B)
    assert owner is not None and KEY_A not in owner and len(owner) == 32
    assert ApiKeys([]).authenticate(None) is None  # no keys: open, no owner
    headers = [(b"authorization", b"bearer  k1 "), (b"x-api-key", b"k2")]
    assert presented_key(headers) == "k1"
    assert presented_key([(b"x-api-key", b"k2")]) == "k2"
    assert presented_key([(b"authorization", b"Basic abc")]) is None


def test_stream_ids_carry_128_random_bits() -> None:
    ids = {new_stream_id() for _ in range(2000)}
    assert len(ids) == 2000
    for stream_id in list(ids)[:50]:
        raw = base64.urlsafe_b64decode(stream_id + "=" * (-len(stream_id) % 4))
        assert len(raw) == 16


# -- limits ------------------------------------------------------------------------------------


def test_body_too_large_is_413_announced_or_chunked(keyed: RunningServer) -> None:
    big = chat("x" * 70_000)
    response = HTTP.post(f"{keyed.url}/v1/chat/completions", json=big, headers=bearer(KEY_A))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    response = HTTP.post(
        f"{keyed.url}/v1/messages",
        json={**anthropic_body(), "system": "x" * 70_000},
        headers={"x-api-key": KEY_A},
    )
    assert response.status_code == 413 and response.json()["type"] == "error"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap counts bytes as they come
        yield b'{"model": "default", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}]}'

    response = HTTP.post(
        f"{keyed.url}/v1/chat/completions", content=chunks(), headers=bearer(KEY_A)
    )
    assert response.status_code == 413


def test_max_tokens_is_clamped_to_the_limit(keyed: RunningServer) -> None:
    response = HTTP.post(
        f"{keyed.url}/v1/chat/completions",
        json=chat("Write a very long story about the sea.", max_tokens=4000, temperature=0),
        headers=bearer(KEY_A),
        timeout=60,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["usage"]["completion_tokens"] <= 48
    assert body["choices"][0]["finish_reason"] == "length"


def test_concurrent_streams_per_key_are_capped_with_retry_after(keyed: RunningServer) -> None:
    long = chat("Count from one to one hundred in words.", max_tokens=48, stream=True)
    url = f"{keyed.url}/v1/chat/completions"
    with httpx.Client(timeout=60) as client:
        open_ = [client.send(client.build_request("POST", url, json=long, headers=bearer(KEY_A)),
                             stream=True) for _ in range(2)]  # fmt: skip
        try:
            assert [r.status_code for r in open_] == [200, 200]
            third = client.post(url, json=long, headers=bearer(KEY_A))
            other_key = client.post(url, json={**long, "stream": False}, headers=bearer(KEY_B))
        finally:
            for response in open_:
                response.close()
    assert third.status_code == 429
    assert int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["code"] == "too_many_streams"
    assert other_key.status_code == 200  # the cap is per key


def test_rate_limit_is_429_with_retry_after_per_key(limited: RunningServer) -> None:
    url = f"{limited.url}/v1/models"
    statuses = [HTTP.get(url, headers=bearer("r1")).status_code for _ in range(4)]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    refused = HTTP.get(url, headers=bearer("r1"))
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    retry_after = int(refused.headers["retry-after"])
    assert retry_after >= 1
    assert HTTP.get(url, headers=bearer("r3")).status_code == 200  # another key's bucket
    messages = HTTP.post(f"{limited.url}/v1/messages", json=anthropic_body(), headers=bearer("r1"))
    assert messages.status_code == 429 and messages.json()["error"]["type"] == "rate_limit_error"
    time.sleep(retry_after + 0.1)
    assert HTTP.get(url, headers=bearer("r1")).status_code == 200


def test_stream_over_its_journal_limit_fails_typed_and_keeps_the_partial(
    limited: RunningServer,
) -> None:
    stream_id, events = start_native(
        limited, "r2", content="Tell me a long story about a dragon.", max_tokens=300
    )
    terminals = [e for e in events if e["type"].startswith("stream.") and e["seq"] > 0]
    assert len(terminals) == 1
    assert terminals[0]["type"] == "stream.failed"
    assert terminals[0]["error"]["type"] == "stream_too_large"
    text = "".join(e["text"] for e in events if e["type"] == "text.delta")
    assert text
    # The journal kept what was sent before the failure: a resume replays the same events.
    replay = HTTP.get(f"{limited.url}/v1/streams/{stream_id}", headers=bearer("r2"), timeout=30)
    replayed = [
        json.loads(line[5:]) for line in replay.text.splitlines() if line.startswith("data:")
    ]
    assert replayed == events
    # Bounded: the limit, plus the terminal event that reports it.
    assert sum(len(json.dumps(e, separators=(",", ":"))) for e in events) < 1500 + 400


def test_rate_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("k")
    with pytest.raises(Overloaded) as raised:
        limiter.take("k")
    assert raised.value.retry_after >= 1
    limiter.take("other")  # separate bucket
    now[0] += 0.5  # one token back at 2/s
    limiter.take("k")
    with pytest.raises(Overloaded):
        limiter.take("k")
    assert not RateLimiter(0).enabled


def test_memory_journal_evicts_oldest_finished_streams_first_by_bytes() -> None:
    async def main() -> None:
        journal = MemoryJournal(max_bytes=20_000)
        ids = []
        active = StreamMeta(id="active", model="m", protocol="native", created=0)
        await journal.create(active)
        await journal.append("active", StreamStarted(id="active", model="m", created=0))
        for i in range(30):
            meta = StreamMeta(id=f"s{i}", model="m", protocol="native", created=0)
            await journal.create(meta)
            await journal.append(meta.id, StreamStarted(id=meta.id, model="m", created=0))
            for _ in range(10):
                await journal.append(meta.id, TextDelta(text="x" * 100))
                await journal.append("active", TextDelta(text="y" * 10))
            await journal.append(meta.id, StreamCompleted(finish_reason="stop"))
            ids.append(meta.id)
            assert journal.stats()["bytes"] <= 20_000 + 2_000  # one stream's worth of slack
        kept = [sid for sid in ids if sid in journal._logs]
        assert kept and kept == ids[-len(kept) :]  # the oldest went first
        assert len(kept) < len(ids)
        assert len((await journal.meta("active")).id) and len(journal._logs["active"].events) > 1
        from tokenwire.errors import StreamExpired

        with pytest.raises(StreamExpired):
            await journal.meta(ids[0])

    asyncio.run(main())


def test_raw_socket_sees_401_before_any_body_is_read(keyed: RunningServer) -> None:
    # A client announcing a huge body without a key is refused at once, body unread.
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n{"
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401")


def test_metrics_can_require_a_key(limited: RunningServer) -> None:
    assert HTTP.get(f"{limited.url}/metrics").status_code == 401
    assert HTTP.get(f"{limited.url}/metrics", headers=bearer("r3")).status_code == 200
    assert HTTP.get(f"{limited.url}/healthz").status_code == 200


def test_keys_from_the_config_file_and_the_exposure_warning(tmp_path: Path) -> None:
    config = tmp_path / "tokenwire.toml"
    config.write_text('api_keys = ["from-file-1", "from-file-2"]\nmax_tokens_limit = 9\n')
    settings = Settings.load({"config": str(config)}, env={})
    assert settings.api_keys == ["from-file-1", "from-file-2"]
    assert settings.max_tokens_limit == 9
    assert Settings.load({}, env={"TOKENWIRE_API_KEYS": "a, b"}).api_keys == ["a", "b"]
    # Open and reachable beyond loopback: a loud banner; keys or loopback: none.
    warning = exposure_warning(Settings(host="0.0.0.0"))
    assert warning is not None and "no API keys" in warning and "!!!!" in warning
    assert exposure_warning(Settings(host="0.0.0.0", api_keys=["k"])) is None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(Settings(host=host)) is None
