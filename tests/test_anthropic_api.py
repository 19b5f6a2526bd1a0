"""POST /v1/messages with the official ``anthropic`` package, unmodified: on the embedded model
and through the gateway (OpenAI- and Anthropic-kind upstreams), errors in Anthropic's shape,
resume in Anthropic's format, tool calls as tool_use blocks, errors mid-stream."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.conftest import RunningServer
from tests.fault_upstream import RunningFault, fault_upstream
from tests.gateway_support import gateway, iter_sse

USER = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def fault() -> Iterator[RunningFault]:
    with fault_upstream() as running:
        yield running


@pytest.fixture(scope="module")
def gw(
    server: RunningServer, fault: RunningFault, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    config = tmp_path_factory.mktemp("gw") / "gateway.toml"
    config.write_text(
        f"""
[gateway]
refresh_models = 0

[upstreams.tw]
url = "{server.url}/v1"
discover_models = false
default_model = "default"

[upstreams.claude]
kind = "anthropic"
url = "{server.url}/v1"
discover_models = false
default_model = "default"

[upstreams.fault]
url = "{fault.url}"
"""
    )
    with gateway(config) as running:
        yield running


def gw_client(gw: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)


# -- the embedded model ----------------------------------------------------------------------


def test_raw_stream_has_anthropics_event_order(client: anthropic.Anthropic) -> None:
    events = list(client.messages.create(model="default", max_tokens=8, messages=USER, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[-2] == "message_delta"  # (the client drops ping events itself)
    first_delta = kinds.index("content_block_delta")
    assert kinds.index("content_block_start") < first_delta < kinds.index("content_block_stop")
    assert kinds.index("content_block_stop") < kinds.index("message_delta")
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert len(deltas) >= 4  # token by token
    assert all(e.index == 0 and e.delta.type == "text_delta" for e in deltas)
    message_delta = events[-2]
    assert message_delta.delta.stop_reason == "max_tokens"
    assert message_delta.usage.output_tokens == 8


def test_stream_helper_accumulates_the_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="default", max_tokens=12, messages=USER, system="Be brief."
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.role == "assistant" and final.id.startswith("msg_")
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == 12


def test_non_streaming_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="default", max_tokens=6, messages=USER, stop_sequences=["\n\n\n"]
    )
    assert message.type == "message" and message.content[0].type == "text"
    assert message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens <= 6


def test_errors_have_anthropics_shape(client: anthropic.Anthropic, server: RunningServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as not_found:
        client.messages.create(model="nope", max_tokens=5, messages=USER)
    assert not_found.value.body["type"] == "error"  # type: ignore[index]
    assert not_found.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(
            model="default", max_tokens=5, messages=USER, extra_body={"temperature": 1.5}
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]

    url = f"{server.url}/v1/messages"
    cases = [
        (b"{not json", 400),
        (b'{"model": "default", "messages": [{"role": "user", "content": "hi"}]}', 400),
        (
            b'{"model": "default", "max_tokens": 5, "messages": [{"role": "user", "content": '
            b'[{"type": "image", "source": {"type": "base64", "media_type": "image/png", '
            b'"data": "AA=="}}]}]}',
            400,
        ),
    ]
    for body, status in cases:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, body
        data = response.json()
        assert data["type"] == "error" and set(data["error"]) == {"type", "message"}
        assert data["error"]["type"] == "invalid_request_error"
    missing = httpx.post(url, json={"model": "default", "messages": USER}).json()
    assert "max_tokens" in missing["error"]["message"]
    wrong_method = httpx.get(url)
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"


def test_resume_continues_in_anthropic_format(server: RunningServer) -> None:
    body = {"model": "default", "max_tokens": 24, "messages": USER, "stream": True}
    first: list[dict] = []
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=60) as response:
        stream_id = response.headers["x-stream-id"]
        last_id = -1
        events = iter_sse(response)
        for sse in events:
            first.append(sse.json())
            last_id = sse.id if sse.id is not None else last_id
            if sum(1 for e in first if e["type"] == "content_block_delta") == 3:
                break
        # A second connection resumes after the last event id the first one saw (the
        # first stays open, so the disconnect policy does not end the stream).
        with httpx.stream(
            "GET",
            f"{server.url}/v1/streams/{stream_id}",
            headers={"last-event-id": str(last_id)},
            timeout=60,
        ) as resumed:
            rest = [sse.json() for sse in iter_sse(resumed)]
    kinds = [e["type"] for e in rest]
    assert "message_start" not in kinds and "content_block_start" not in kinds
    assert kinds[0] in ("content_block_delta", "content_block_stop")
    assert kinds[-1] == "message_stop"
    assert all(e["index"] == 0 for e in rest if e["type"].startswith("content_block"))
    with httpx.stream("GET", f"{server.url}/v1/streams/{stream_id}?after=-1") as response:
        whole = [sse.json() for sse in iter_sse(response)]

    def text(events: list[dict]) -> str:
        return "".join(
            e["delta"]["text"]
            for e in events
            if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
        )

    assert text(first) + text(rest) == text(whole)
    assert [e["type"] for e in whole[:3]] == ["message_start", "ping", "content_block_start"]


# -- through the gateway ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tw", "claude"])
def test_anthropic_client_streams_through_the_gateway(gw: RunningServer, model: str) -> None:
    with gw_client(gw).messages.stream(model=model, max_tokens=10, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len([p for p in pieces if p]) >= 3
    assert final.content[0].text == "".join(pieces)  # type: ignore[union-attr]
    # Usage crosses both hops: the upstream's counts, not zeros.
    assert final.usage.output_tokens == 10 and final.usage.input_tokens > 0


def test_openai_client_through_an_anthropic_upstream(gw: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="claude",
        messages=USER,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_tool_calls_render_as_tool_use_blocks(gw: RunningServer) -> None:
    with gw_client(gw).messages.stream(
        model="tools",
        max_tokens=50,
        messages=USER,
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert "".join(partial) == '{"city": "Paris"}' and len(partial) == 3
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"city": "Paris"} and block.id == "call_fault1"
    assert final.stop_reason == "tool_use"


def test_error_mid_stream_is_an_error_event_after_the_partial_text(gw: RunningServer) -> None:
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/messages",
        json={
            "model": "crash",
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": "after=3 gap=0.01"}],
        },
        timeout=30,
    ) as response:
        events = [(sse.event, sse.json()) for sse in iter_sse(response)]
    kinds = [name for name, _ in events]
    assert kinds[0] == "message_start" and kinds[-1] == "error"
    assert "message_stop" not in kinds
    texts = [e["delta"]["text"] for name, e in events if name == "content_block_delta"]
    assert "".join(texts) == "tok0 tok1 tok2 "
    assert events[-1][1]["error"]["type"] == "api_error"

    pieces: list[str] = []
    # The official client raises on the error event.
    with (
        pytest.raises(anthropic.APIError),
        gw_client(gw).messages.stream(
            model="crash", max_tokens=50, messages=[{"role": "user", "content": "after=2"}]
        ) as stream,
    ):
        for piece in stream.text_stream:
            pieces.append(piece)
    assert "".join(pieces) == "tok0 tok1 "
