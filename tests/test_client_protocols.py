"""The client reads foreign streams: recorded OpenAI and Anthropic streams, in the shapes
their documentation shows (tool calls, thinking blocks, pings, errors), replayed over real
HTTP by a recording peer, come out as the same typed events tokenwire emits.

The peer is a stand-in only because no OpenAI or Anthropic server runs offline; the real
tokenwire protocols are covered end to end in ``test_client.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tokenwire.client import Client
from tokenwire.client._protocols import build_request
from tokenwire.errors import BackendUnavailable, StreamInterrupted
from tokenwire.events import (
    StreamCompleted,
    StreamFailed,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)

from .conftest import free_port, wait_until_healthy


def sse(event: str | None, data: object) -> bytes:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {body}\n\n".encode()


def anthropic_stream(*, tool: bool, thinking: bool = False, error: bool = False) -> list[bytes]:
    message = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-test",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1},
    }
    out = [sse("message_start", {"type": "message_start", "message": message})]
    index = 0
    if thinking:
        out += [
            sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "thinking", "thinking": ""},
                },
            ),
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "Let me think"},
                },
            ),
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "signature_delta", "signature": "EqQB"},
                },
            ),
            sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]
        index = 1
    out += [
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        sse("ping", {"type": "ping"}),
    ]
    for piece in ["Hello", "!", " Checking", " the weather."]:
        out.append(
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        )
    out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    if error:
        return [
            *out,
            sse(
                "error",
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            ),
        ]
    stop_reason = "end_turn"
    if tool:
        stop_reason = "tool_use"
        out.append(
            sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index + 1,
                    "content_block": {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": "get_weather",
                        "input": {},
                    },
                },
            )
        )
        for partial in ["", '{"location":', ' "San Francisco, CA"}']:
            out.append(
                sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index + 1,
                        "delta": {"type": "input_json_delta", "partial_json": partial},
                    },
                )
            )
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index + 1}))
    out += [
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": 15},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return out


def openai_stream(*, tool: bool) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x"}

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse(None, {**base, "choices": [choice]})

    out = [chunk({"role": "assistant", "content": ""})]
    if tool:
        out += [
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"location"'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}),
            chunk({}, "tool_calls"),
        ]
    else:
        out += [chunk({"content": "Hello"}), chunk({"content": " there"}), chunk({}, "stop")]
    out.append(
        sse(
            None,
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
            },
        )
    )
    out.append(sse(None, "[DONE]"))
    return out


@dataclass
class RecordingPeer:
    url: str
    script: list[bytes] = field(default_factory=list)
    requests: list[tuple[dict[str, str], dict[str, object]]] = field(default_factory=list)
    drop_after: int | None = None  # end the body early, after this many frames


@contextmanager
def recording_peer() -> Iterator[RecordingPeer]:
    port = free_port()
    peer = RecordingPeer(url=f"http://127.0.0.1:{port}")

    async def replay(request: Request) -> StreamingResponse:
        peer.requests.append((dict(request.headers), await request.json()))
        frames = peer.script if peer.drop_after is None else peer.script[: peer.drop_after]

        async def body() -> Iterator[bytes]:  # type: ignore[misc]
            for frame in frames:
                yield frame
            if peer.drop_after is not None:
                raise RuntimeError("the peer dies mid-stream")

        return StreamingResponse(body(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return Response("ok")

    app = Starlette(
        routes=[
            Route("/v1/messages", replay, methods=["POST"]),
            Route("/v1/chat/completions", replay, methods=["POST"]),
            Route("/health", health),
        ]
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until_healthy(f"{peer.url}/health", None, timeout=30)
        yield peer
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def peer() -> Iterator[RecordingPeer]:
    with recording_peer() as running:
        yield running


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in SF?"},
]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def test_anthropic_text_and_tool_use(peer: RecordingPeer) -> None:
    peer.script, peer.drop_after = anthropic_stream(tool=True, thinking=True), None
    with (
        Client(peer.url, "sk-ant-test", protocol="anthropic") as client,
        client.chat.stream(
            model="claude-test", messages=MESSAGES, tools=[TOOL], tool_choice="required", stop="X"
        ) as stream,
    ):
        events = list(stream)
    kinds = [type(e) for e in events]
    assert kinds == [
        StreamStarted,
        *[TextDelta] * 4,
        ToolCallStarted,
        ToolCallDelta,
        ToolCallDelta,
        ToolCallCompleted,
        Usage,
        StreamCompleted,
    ]
    result = stream.final()
    assert result.text == "Hello! Checking the weather."  # thinking is not answer text
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls[0].name == "get_weather"
    assert json.loads(result.tool_calls[0].arguments) == {"location": "San Francisco, CA"}
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (25, 15)
    assert result.model == "claude-test" and not stream.resumable
    # The request was Anthropic's shape: system apart, max_tokens, stop_sequences, tools.
    headers, body = peer.requests[-1]
    assert headers["x-api-key"] == "sk-ant-test" and "authorization" not in headers
    assert headers["anthropic-version"]
    assert body["system"] == "Be brief." and body["max_tokens"] == 1024
    assert body["messages"] == MESSAGES[1:] and body["stop_sequences"] == ["X"]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "",
            "input_schema": TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    assert body["tool_choice"] == {"type": "any"} and body["stream"] is True


def test_anthropic_error_event_is_a_typed_failure(peer: RecordingPeer) -> None:
    peer.script, peer.drop_after = anthropic_stream(tool=False, error=True), None
    with (
        Client(peer.url, protocol="anthropic") as client,
        client.chat.stream(messages=MESSAGES) as stream,
    ):
        events = list(stream)
        assert isinstance(events[-1], StreamFailed)
        assert events[-1].error["type"] == "overloaded_error"
        with pytest.raises(BackendUnavailable) as info:
            stream.final()
    assert info.value.partial_text == "Hello! Checking the weather."  # type: ignore[attr-defined]


def test_openai_tool_call_chunks(peer: RecordingPeer) -> None:
    peer.script, peer.drop_after = openai_stream(tool=True), None
    with (
        Client(peer.url, "sk-test", protocol="openai") as client,
        client.chat.stream(model="gpt-x", messages=MESSAGES, tools=[TOOL]) as stream,
    ):
        events = list(stream)
    assert [type(e) for e in events] == [
        StreamStarted,
        ToolCallStarted,
        ToolCallDelta,
        ToolCallDelta,
        ToolCallCompleted,
        Usage,
        StreamCompleted,
    ]
    result = stream.final()
    assert result.finish_reason == "tool_calls"
    assert json.loads(result.tool_calls[0].arguments) == {"location": "Paris"}
    headers, body = peer.requests[-1]
    assert headers["authorization"] == "Bearer sk-test"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_openai_drop_without_stream_id_is_interrupted(peer: RecordingPeer) -> None:
    peer.script, peer.drop_after = openai_stream(tool=False), 3
    before = len(peer.requests)
    with (
        Client(peer.url, protocol="openai") as client,
        pytest.raises(StreamInterrupted) as info,
        client.chat.stream(messages=MESSAGES) as stream,
    ):
        for _ in stream:
            pass
    assert info.value.partial_text == "Hello there"
    assert len(peer.requests) == before + 1  # no stream id: nothing to resume, no retry


def test_anthropic_request_shape_without_tools() -> None:
    path, body = build_request(
        "anthropic", "m", [{"role": "user", "content": "hi"}], {"max_tokens": 5, "seed": 1}
    )
    assert path == "/v1/messages"
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
    }
