"""GET /v1/ws against a real server and the embedded model: start, several streams on one
socket, Stop, resume on a new socket, typed errors that leave the socket usable."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from .conftest import RunningServer, tokenwire_server

pytestmark = pytest.mark.anyio

STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


@pytest.fixture(scope="module")
def ws_server() -> Iterator[RunningServer]:
    with tokenwire_server(
        "--disconnect-grace", "20", "--heartbeat", "1", "--threads", "1"
    ) as running:
        yield running


def ws_url(server: RunningServer) -> str:
    return server.url.replace("http://", "ws://") + "/v1/ws"


def chat(max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    return {"model": "default", "messages": STORY, "max_tokens": max_tokens, **extra}


async def receive(ws: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 60))
    return message


async def until_terminal(ws: Any, stream_id: str | None = None) -> list[dict[str, Any]]:
    out = []
    while True:
        message = await receive(ws)
        if stream_id is not None and message.get("stream_id") != stream_id:
            continue
        out.append(message)
        if message["type"] in ("stream.completed", "stream.cancelled", "stream.failed"):
            return out


def text_of(messages: list[dict[str, Any]]) -> str:
    return "".join(m["text"] for m in messages if m["type"] == "text.delta")


async def test_start_streams_native_events_in_order(ws_server: RunningServer) -> None:
    async with websockets.connect(ws_url(ws_server)) as ws:
        await ws.send(json.dumps({"type": "start", "request": chat(16), "ref": "a1"}))
        messages = await until_terminal(ws)
    first = messages[0]
    assert first["type"] == "stream.started" and first["seq"] == 0 and first["ref"] == "a1"
    stream_id = first["stream_id"]
    assert first["id"] == stream_id
    assert all(m["stream_id"] == stream_id for m in messages)
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert "ref" not in messages[1]
    deltas = [m for m in messages if m["type"] == "text.delta"]
    assert deltas and all(isinstance(m["text"], str) for m in deltas)
    assert messages[-1]["type"] == "stream.completed"
    assert messages[-1]["finish_reason"] == "length"


async def test_several_streams_share_one_socket(ws_server: RunningServer) -> None:
    async with websockets.connect(ws_url(ws_server)) as ws:
        for ref in ("x", "y", "z"):
            await ws.send(json.dumps({"type": "start", "request": chat(12), "ref": ref}))
        by_stream: dict[str, list[dict[str, Any]]] = {}
        refs: dict[str, str] = {}
        done = 0
        while done < 3:
            message = await receive(ws)
            by_stream.setdefault(message["stream_id"], []).append(message)
            if "ref" in message:
                refs[message["stream_id"]] = message["ref"]
            done += message["type"] == "stream.completed"
    assert sorted(refs.values()) == ["x", "y", "z"]
    for messages in by_stream.values():
        assert [m["seq"] for m in messages] == list(range(len(messages)))
        assert messages[-1]["type"] == "stream.completed"


async def test_cancel_stops_within_a_few_tokens_and_is_idempotent(
    ws_server: RunningServer,
) -> None:
    async with websockets.connect(ws_url(ws_server)) as ws:
        await ws.send(json.dumps({"type": "start", "request": chat(2000)}))
        stream_id = None
        deltas = 0
        while deltas < 5:
            message = await receive(ws)
            stream_id = message["stream_id"]
            deltas += message["type"] == "text.delta"
        await ws.send(json.dumps({"type": "cancel", "stream_id": stream_id}))
        after_cancel = []
        accepted = False
        while True:
            message = await receive(ws)
            if message["type"] == "cancel.accepted":
                accepted = True
                continue
            after_cancel.append(message)
            if message["type"] == "stream.cancelled":
                break
        assert accepted
        assert after_cancel[-1]["reason"] == "stop"
        assert sum(m["type"] == "text.delta" for m in after_cancel) <= 4
        # Idempotent: a second Stop of a finished stream is accepted, not an error.
        await ws.send(json.dumps({"type": "cancel", "stream_id": stream_id}))
        assert await receive(ws) == {"type": "cancel.accepted", "stream_id": stream_id}


async def test_resume_on_a_new_socket_continues_without_gap(ws_server: RunningServer) -> None:
    """Closing the socket detaches the reader; generation goes on within the grace."""
    async with websockets.connect(ws_url(ws_server)) as ws:
        await ws.send(json.dumps({"type": "start", "request": chat(120, seed=7)}))
        seen = [await receive(ws) for _ in range(6)]
    stream_id = seen[0]["stream_id"]
    closed_at = time.monotonic()
    await asyncio.sleep(0.5)
    async with websockets.connect(ws_url(ws_server)) as ws:
        after = seen[-1]["seq"]
        await ws.send(json.dumps({"type": "resume", "stream_id": stream_id, "after": after}))
        rest = await until_terminal(ws, stream_id)
        assert time.monotonic() - closed_at < 60
        await ws.send(json.dumps({"type": "resume", "stream_id": stream_id, "after": -1}))
        replay = await until_terminal(ws, stream_id)
    assert [m["seq"] for m in seen + rest] == list(range(len(seen) + len(rest)))
    assert rest[-1]["type"] == "stream.completed"  # not cancelled: the grace kept it going
    assert text_of(seen + rest) == text_of(replay)
    assert replay == seen + rest


async def test_bad_messages_are_typed_errors_and_the_socket_survives(
    ws_server: RunningServer,
) -> None:
    async with websockets.connect(ws_url(ws_server)) as ws:
        await ws.send("{not json")
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        await ws.send(json.dumps([1, 2]))
        assert (await receive(ws))["error"]["type"] == "invalid_request_error"
        await ws.send(json.dumps({"type": "dance"}))
        assert "Unknown message type" in (await receive(ws))["error"]["message"]
        await ws.send(json.dumps({"type": "start", "request": {"model": "default"}, "ref": 9}))
        error = await receive(ws)
        assert error["ref"] == 9 and "messages" in error["error"]["message"]
        await ws.send(json.dumps({"type": "start", "request": chat(model="nope"), "ref": 10}))
        error = await receive(ws)
        assert error["ref"] == 10 and error["error"]["code"] == "model_not_found"
        await ws.send(json.dumps({"type": "resume", "stream_id": "missing", "after": 0}))
        error = await receive(ws)
        assert error["stream_id"] == "missing"
        assert error["error"]["type"] == "not_found_error"
        await ws.send(json.dumps({"type": "resume", "stream_id": "missing", "after": "x"}))
        assert "after" in (await receive(ws))["error"]["message"]
        await ws.send(json.dumps({"type": "cancel"}))
        assert "stream_id" in (await receive(ws))["error"]["message"]
        await ws.send(b"\x00\x01")
        assert (await receive(ws))["type"] == "error"
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}
        # Still able to stream after all that.
        await ws.send(json.dumps({"type": "start", "request": chat(4)}))
        assert (await until_terminal(ws))[-1]["type"] == "stream.completed"
