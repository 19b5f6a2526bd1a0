"""The gateway against real upstreams the tests start: a second tokenwire (embedded model),
llama-cpp-python's own server, and the fault-injecting upstream (tests/fault_upstream.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from tests.conftest import RunningServer, free_port, tokenwire_server
from tests.fault_upstream import SCENARIOS, RunningFault, fault_upstream
from tests.gateway_support import (
    RunningLlama,
    gateway,
    iter_sse,
    llama_server,
    openai_text,
    post_stream,
    wait_for,
)
from tokenwire.codecs.anthropic import MessagesDecoder
from tokenwire.codecs.openai import ChatDecoder
from tokenwire.codecs.sse import SSEDecoder
from tokenwire.errors import BackendProtocolError, BackendUnavailable
from tokenwire.events import StreamCompleted, TextDelta, ToolCallCompleted, ToolCallStarted, Usage

pytestmark = pytest.mark.e2e

CONFIG = """
[gateway]
default = "tw"
refresh_models = 0
cooldown = 0

[upstreams.tw]
url = "{tw}/v1"

[upstreams.llama]
url = "{llama}"

[upstreams.fault]
url = "{fault}"
priority = 1
first_token_timeout = 5
idle_timeout = 1.0
aliases = {{ via-down = "ok", via-500 = "ok", via-silent = "ok", via-empty = "ok" }}

[upstreams.down]
url = "http://127.0.0.1:{closed}/v1"
discover_models = false
models = ["via-down"]

[upstreams.broken]
url = "{fault}"
discover_models = false
aliases = {{ via-500 = "error500", via-empty = "empty" }}

[upstreams.old]
url = "{fault}"
discover_models = false
aliases = {{ via-old = "ok" }}

[upstreams.slow]
url = "{fault}"
discover_models = false
first_token_timeout = 0.6
aliases = {{ via-silent = "silent" }}
"""


@pytest.fixture(scope="module")
def fault() -> Iterator[RunningFault]:
    with fault_upstream() as running:
        yield running


@pytest.fixture(scope="module")
def llama() -> Iterator[RunningLlama]:
    with llama_server() as running:
        yield running


@pytest.fixture(scope="module")
def gw(
    server: RunningServer,
    llama: RunningLlama,
    fault: RunningFault,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    config = tmp_path_factory.mktemp("gw") / "gateway.toml"
    config.write_text(
        CONFIG.format(tw=server.url, llama=llama.url, fault=fault.url, closed=free_port())
    )
    with gateway(config) as running:
        yield running


def native(gw: RunningServer, body: dict[str, object], timeout: float = 60) -> list[dict]:
    read = post_stream(f"{gw.url}/v1/streams", body, timeout=timeout)
    assert read.status == 200, read.body
    return [sse.json() for sse in read.events]


def texts(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "text.delta")


def chat(model: str, content: str = "hello", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def record_for(fault: RunningFault, marker: str) -> list[dict]:
    """The fault upstream's records of requests whose prompt contains ``marker``."""
    return [
        r
        for r in fault.stats()
        if any(marker in str(m.get("content")) for m in r["request"]["messages"])
    ]


# -- unit: incremental parsing ---------------------------------------------------------------


def test_sse_parser_gives_the_same_messages_however_the_bytes_are_split() -> None:
    raw = (
        b': comment\r\n\r\nevent: message_start\r\ndata: {"a": 1}\r\n\r\n'
        b"data: line one\ndata: line two\n\ndata:[DONE]\r\r"
    )
    expected = [
        ("message_start", b'{"a": 1}', ""),
        ("", b"line one\nline two", ""),
        ("", b"[DONE]", ""),
    ]
    for size in range(1, len(raw) + 1):
        parser = SSEDecoder()
        got = []
        for start in range(0, len(raw), size):
            got += parser.feed_raw(raw[start : start + size])
        assert got == expected, size


def test_openai_decoder_normalizes_text_tool_calls_usage_and_errors() -> None:
    decoder = ChatDecoder()
    events = decoder.decode("", b'{"choices":[{"delta":{"role":"assistant","content":"Hi"}}]}')
    assert events == [TextDelta(text="Hi")]
    call = b'{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":"{\\"x"}}]}}]}'  # noqa: E501
    events = decoder.decode("", call)
    assert isinstance(events[0], ToolCallStarted) and events[0].name == "f"
    assert events[1].arguments_delta == '{"x'  # type: ignore[attr-defined]
    more = b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\":1}"}}]},"finish_reason":"tool_calls"}]}'  # noqa: E501
    events = decoder.decode("", more)
    assert isinstance(events[-1], ToolCallCompleted) and events[-1].arguments == '{"x":1}'
    assert (
        decoder.decode("", b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}')
        == []
    )
    end = decoder.decode("", b"[DONE]")
    assert isinstance(end[0], Usage) and end[0].completion_tokens == 2
    assert end[-1] == StreamCompleted(finish_reason="tool_calls") and decoder.done
    with pytest.raises(BackendProtocolError):
        ChatDecoder().decode("", b"{not json")
    with pytest.raises(BackendProtocolError):
        ChatDecoder().decode("", b'{"choices":[{"delta":"nope"}]}')
    with pytest.raises(BackendUnavailable):
        ChatDecoder().decode("", b'{"error":{"message":"boom"}}')
    with pytest.raises(BackendUnavailable):  # the body ended mid-answer
        ChatDecoder().finish()


def test_anthropic_decoder_normalizes_blocks_tool_use_usage_and_errors() -> None:
    decoder = MessagesDecoder()
    stream = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 11, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "tu_1", "name": "f", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"a":'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": " 1}"},
        },
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    events = []
    for message in stream:
        events += decoder.decode(message["type"], orjson.dumps(message))
    assert [e.type for e in events] == [
        "text.delta",
        "tool_call.started",
        "tool_call.delta",
        "tool_call.delta",
        "tool_call.completed",
        "usage",
        "stream.completed",
    ]
    assert events[4] == ToolCallCompleted(index=0, id="tu_1", name="f", arguments='{"a": 1}')
    assert events[5] == Usage(prompt_tokens=11, completion_tokens=9)
    assert events[6] == StreamCompleted(finish_reason="tool_calls") and decoder.done
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    with pytest.raises(BackendUnavailable, match="overloaded_error"):
        MessagesDecoder().decode("error", orjson.dumps(error))
    with pytest.raises(BackendProtocolError):
        MessagesDecoder().decode("content_block_delta", b'{"type": "content_block_delta"}')
    with pytest.raises(BackendUnavailable):
        MessagesDecoder().finish()


# -- routing ---------------------------------------------------------------------------------


def test_models_lists_every_routed_model(gw: RunningServer, server: RunningServer) -> None:
    ids = {m["id"] for m in httpx.get(f"{gw.url}/v1/models").json()["data"]}
    upstream_ids = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert {"default", "tw", "llama", "fault", "down", "ok", "crash", "via-500"} <= ids
    assert upstream_ids <= ids  # what the second tokenwire lists at its /v1/models
    assert any(i.endswith(".gguf") for i in ids)  # what llama.cpp's server lists


def test_unknown_model_is_404_in_openai_shape(gw: RunningServer) -> None:
    response = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("nope"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_default_routes_to_the_configured_upstream_without_embedded(gw: RunningServer) -> None:
    events = native(gw, chat("default", max_tokens=8, temperature=0))
    assert events[0]["type"] == "stream.started"
    assert events[-1]["type"] == "stream.completed"
    assert texts(events)


# -- streaming through real peers ------------------------------------------------------------


def test_openai_client_streams_from_llama_cpp_server_through_gateway(gw: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 5  # token by token, not one lump
    assert "".join(pieces).strip()


def test_openai_client_streams_from_second_tokenwire_with_usage(gw: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="tw",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None
    assert usage.completion_tokens == 12 and usage.prompt_tokens > 0  # passed through


def test_sampling_and_usage_request_are_forwarded(gw: RunningServer, fault: RunningFault) -> None:
    body = chat(
        "ok",
        "n=2 gap=0 marker-forward",
        max_tokens=5,
        seed=7,
        stop=["zz"],
        temperature=0.3,
        top_p=0.9,
        presence_penalty=0.5,
        user="u1",
    )
    events = native(gw, body)
    assert texts(events) == "tok0 tok1 "
    usage = next(e for e in events if e["type"] == "usage")
    assert usage["completion_tokens"] == 2 and usage["ttft_ms"] is not None
    sent = record_for(fault, "marker-forward")[-1]["request"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["seed"], sent["stop"]) == (5, 7, ["zz"])
    assert (sent["temperature"], sent["top_p"], sent["presence_penalty"]) == (0.3, 0.9, 0.5)
    assert sent["user"] == "u1"


def test_an_upstream_refusing_stream_options_is_retried_without_it(
    gw: RunningServer, fault: RunningFault
) -> None:
    marker = "marker-old-server"
    for _ in range(2):
        events = native(gw, chat("via-old", f"n=2 gap=0 no_stream_options=1 {marker}"))
        assert texts(events) == "tok0 tok1 " and events[-1]["type"] == "stream.completed"
    records = record_for(fault, marker)
    # Refused once, retried without the field, and remembered for the next request.
    assert [r["outcome"] for r in records] == ["status_400", "completed", "completed"]
    assert "stream_options" not in records[-1]["request"]


def test_trickle_is_forwarded_the_moment_each_chunk_arrives(gw: RunningServer) -> None:
    started = time.monotonic()
    read = post_stream(f"{gw.url}/v1/chat/completions", chat("trickle", "n=5 gap=0.3", stream=True))
    arrivals = [sse.at for sse in read.events if sse.data != "[DONE]" and openai_text([sse])]
    assert openai_text(read.events) == "abcde"
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Upstream sends one character every 0.3 s: each must arrive on its own, not batched.
    assert len(gaps) == 4 and all(gap > 0.15 for gap in gaps), gaps
    assert arrivals[0] - started < 1.0


def test_tool_call_deltas_are_normalized(gw: RunningServer) -> None:
    events = native(gw, chat("tools"))
    kinds = [e["type"] for e in events]
    started = next(e for e in events if e["type"] == "tool_call.started")
    assert (started["id"], started["name"]) == ("call_fault1", "get_weather")
    deltas = "".join(e["arguments_delta"] for e in events if e["type"] == "tool_call.delta")
    assert deltas == '{"city": "Paris"}'
    completed = next(e for e in events if e["type"] == "tool_call.completed")
    assert completed["arguments"] == deltas
    assert kinds.index("tool_call.started") < kinds.index("tool_call.delta")
    assert kinds.index("tool_call.completed") < kinds.index("stream.completed")
    assert events[-1]["finish_reason"] == "tool_calls"


# -- failover before the first token ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "failing_outcome"),
    [
        ("via-down", None),  # connection refused
        ("via-500", "status_500"),
        ("via-empty", "crashed"),  # 200, then the body dies before any token
        ("via-silent", "client_closed"),  # no first token within first_token_timeout
    ],
)
def test_failover_before_first_token_is_invisible(
    gw: RunningServer, fault: RunningFault, model: str, failing_outcome: str | None
) -> None:
    marker = f"marker-{model}"
    read = post_stream(
        f"{gw.url}/v1/chat/completions", chat(model, f"n=4 gap=0 {marker}", stream=True)
    )
    assert read.status == 200
    assert openai_text(read.events) == "tok0 tok1 tok2 tok3 "
    assert read.events[-1].data == "[DONE]"
    assert not any("error" in sse.data for sse in read.events)
    records = record_for(fault, marker)
    outcomes = [r["outcome"] for r in records]
    assert outcomes[-1] == "completed"
    if failing_outcome is not None:
        assert wait_for(
            lambda: failing_outcome in [r["outcome"] for r in record_for(fault, marker)], 5
        )


def test_every_upstream_down_is_a_clean_503_before_any_stream(gw: RunningServer) -> None:
    response = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("down", stream=True))
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "backend_unavailable"


def test_upstream_4xx_is_the_clients_error_before_any_stream(gw: RunningServer) -> None:
    huge = "word " * 6000  # beyond the second tokenwire's 4096-token context
    response = httpx.post(f"{gw.url}/v1/chat/completions", json=chat("tw", huge, stream=True))
    assert response.status_code == 400
    assert "context" in response.json()["error"]["message"]


# -- faults after the first token ------------------------------------------------------------


def test_crash_after_first_token_is_a_typed_error_and_partial_output_stays(
    gw: RunningServer,
) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    got = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in client.chat.completions.create(
            model="crash", messages=[{"role": "user", "content": "after=3 gap=0.01"}], stream=True
        ):
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "tok0 tok1 tok2 "
    assert "broke the connection" in str(raised.value)

    # The journal kept the partial output: a resume replays it, then the typed error.
    read = post_stream(f"{gw.url}/v1/streams", chat("crash", "after=2 gap=0.01"))
    stream_id = read.headers["x-stream-id"]
    events = [sse.json() for sse in read.events]
    assert [e["type"] for e in events][-1] == "stream.failed"
    with httpx.stream("GET", f"{gw.url}/v1/streams/{stream_id}?after=-1", timeout=10) as resp:
        replay = [sse.json() for sse in iter_sse(resp)]
    assert texts(replay) == "tok0 tok1 "
    assert replay[-1]["error"]["type"] == "backend_unavailable"
    assert replay[-1]["error"]["code"] == "upstream_disconnected"


def test_stalled_upstream_hits_the_idle_timeout(gw: RunningServer) -> None:
    read = post_stream(f"{gw.url}/v1/streams", chat("stall", "after=3 gap=0.01"))
    events = [(sse.at, sse.json()) for sse in read.events]
    last_text = max(at for at, e in events if e["type"] == "text.delta")
    failed_at, failed = events[-1]
    assert texts([e for _, e in events]) == "tok0 tok1 tok2 "
    assert failed["type"] == "stream.failed" and failed["error"]["type"] == "backend_timeout"
    assert 0.8 < failed_at - last_text < 5.0  # idle_timeout = 1 s for this upstream


def test_malformed_chunk_is_a_protocol_error_not_a_crash(gw: RunningServer) -> None:
    events = native(gw, chat("malformed", "after=2 gap=0"))
    assert texts(events) == "tok0 tok1 "
    assert events[-1]["type"] == "stream.failed"
    assert events[-1]["error"]["type"] == "backend_protocol_error"
    assert httpx.get(f"{gw.url}/healthz").json()["status"] == "ok"


# -- Stop and disconnect reach the upstream --------------------------------------------------


def test_stop_through_gateway_closes_the_upstream_request(
    gw: RunningServer, fault: RunningFault
) -> None:
    marker = "marker-stop"
    with httpx.stream(
        "POST", f"{gw.url}/v1/streams", json=chat("ok", f"n=3000 gap=0.01 {marker}"), timeout=30
    ) as response:
        stream_id = response.headers["x-stream-id"]
        events = []
        for sse in iter_sse(response):
            events.append(sse.json())
            if len([e for e in events if e["type"] == "text.delta"]) == 3:
                cancelled_at = time.time()
                httpx.post(f"{gw.url}/v1/streams/{stream_id}/cancel").raise_for_status()
    assert events[-1] == {"type": "stream.cancelled", "seq": events[-1]["seq"], "reason": "stop"}
    assert wait_for(lambda: record_for(fault, marker)[-1]["outcome"] == "client_closed", 3)
    record = record_for(fault, marker)[-1]
    assert record["sent"] < 3000
    assert record["ended"] - cancelled_at < 1.0  # the upstream stopped at once


def test_client_disconnect_closes_the_upstream_request(
    gw: RunningServer, fault: RunningFault
) -> None:
    marker = "marker-disconnect"
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        json=chat("ok", f"n=3000 gap=0.01 {marker}", stream=True),
        timeout=30,
    ) as response:
        for count, _ in enumerate(iter_sse(response)):
            if count == 3:
                break
    left_at = time.time()
    assert wait_for(lambda: record_for(fault, marker)[-1]["outcome"] == "client_closed", 3)
    record = record_for(fault, marker)[-1]
    assert record["sent"] < 3000 and record["ended"] - left_at < 1.5


def test_stop_through_gateway_stops_the_upstream_tokenwire(
    gw: RunningServer, server: RunningServer
) -> None:
    assert wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["active_streams"] == 0, 10)
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/streams",
        json=chat("tw", "Tell a long story.", max_tokens=1500),
        timeout=60,
    ) as response:
        stream_id = response.headers["x-stream-id"]
        events = []
        for sse in iter_sse(response):
            events.append(sse.json())
            if len([e for e in events if e["type"] == "text.delta"]) == 3:
                assert httpx.get(f"{server.url}/healthz").json()["active_streams"] == 1
                httpx.post(f"{gw.url}/v1/streams/{stream_id}/cancel").raise_for_status()
    assert events[-1]["type"] == "stream.cancelled"
    # The upstream tokenwire saw its request closed and cancelled its own stream.
    assert wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["active_streams"] == 0, 2)
    assert len([e for e in events if e["type"] == "text.delta"]) < 100


def test_stop_through_gateway_stops_llama_cpp_server(
    gw: RunningServer, llama: RunningLlama
) -> None:
    said_before = llama.log().count("Disconnected from client")
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/streams",
        json=chat("llama", "Tell a very long story about the sea.", max_tokens=1500),
        timeout=60,
    ) as response:
        stream_id = response.headers["x-stream-id"]
        events = []
        for sse in iter_sse(response):
            events.append(sse.json())
            if len([e for e in events if e["type"] == "text.delta"]) == 3:
                httpx.post(f"{gw.url}/v1/streams/{stream_id}/cancel").raise_for_status()
    assert events[-1]["type"] == "stream.cancelled"
    # llama.cpp's server (sse-starlette) notes the closed request and stops its generator.
    assert wait_for(lambda: llama.log().count("Disconnected from client") > said_before, 3)


def test_serve_with_embedded_model_and_an_upstream_flag(fault: RunningFault) -> None:
    """`tokenwire serve --upstream NAME=URL`: the embedded model stays the default."""
    with tokenwire_server("--upstream", f"scripted={fault.url}", "--heartbeat", "1") as both:
        ids = [m["id"] for m in httpx.get(f"{both.url}/v1/models").json()["data"]]
        assert ids[0] == "default" and {"scripted", "ok", "tools"} <= set(ids)
        assert len(ids) > len({"default", "scripted", *SCENARIOS})  # + the embedded model
        upstream = native(both, chat("ok", "n=3 gap=0"))
        assert texts(upstream) == "tok0 tok1 tok2 "
        embedded = native(both, chat("default", max_tokens=4))
        assert embedded[-1]["type"] == "stream.completed" and texts(embedded)
        assert "tok0" not in texts(embedded)
