"""The OpenAI Responses API with the official ``openai`` SDK, against the real embedded model.

Event order, contiguous ``sequence_number`` (== SSE ``id:``), the SDK's stream helpers and
final response, ``parse(text_format=…)``, a tool round trip with ``previous_response_id``,
truncation, background mode (poll, resume after N, cancel mid-generation), errors, 404s,
ownership and the WebSocket mode. Replicas behind nginx: tests/e2e/test_responses_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire.events import (
    StreamCancelled,
    StreamCompleted,
    StreamFailed,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.openai_responses import PROTOCOL, ResponsesRenderer, build, parse_body

from .conftest import RunningServer, tokenwire_server
from .sse_reader import parse_frames

PROMPT = "Write a short story about a lighthouse keeper."
#: Greedy, this prompt makes the model count on for far more tokens than any test waits for.
LONG = {"input": "Count from 1 to 5000, separated by commas: 1, 2, 3,", "temperature": 0}

TEXT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_END = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def client_for(server: RunningServer, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", **kwargs)


def assert_text_order(types: list[str], terminal: str = "response.completed") -> None:
    assert types[:4] == TEXT_ORDER
    deltas = types[4:-4]
    assert deltas and set(deltas) == {"response.output_text.delta"}
    assert types[-4:] == [*TEXT_END, terminal]


# -- the renderer, event by event -----------------------------------------------------------


def meta_for(body: dict[str, Any]) -> StreamMeta:
    parsed = build(parse_body({"model": "m", "input": "hi", **body}))
    return StreamMeta(id="abc", model="m", protocol=PROTOCOL.name, created=1, render=parsed.render)


def rendered(meta: StreamMeta, events: list[Any]) -> list[dict[str, Any]]:
    renderer = ResponsesRenderer(meta)
    out: list[dict[str, Any]] = []
    for seq, event in enumerate(events):
        event.seq = seq
        out.extend(dict(p) for p in renderer.render(event))  # type: ignore[arg-type]
    return out


def test_renderer_numbers_densely_and_closes_items_in_order() -> None:
    meta = meta_for({})
    events = [
        StreamStarted(id="abc", model="m", created=1),
        TextDelta(text="Let me check. "),
        ToolCallStarted(index=0, id="call_1", name="f"),
        ToolCallDelta(index=0, arguments_delta='{"a":'),
        ToolCallDelta(index=0, arguments_delta="1}"),
        ToolCallCompleted(index=0, id="call_1", name="f", arguments='{"a":1}'),
        Usage(prompt_tokens=7, completion_tokens=9, cached_tokens=3),
        StreamCompleted(finish_reason="tool_calls"),
    ]
    payloads = rendered(meta, events)
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert [p["type"] for p in payloads] == [
        *TEXT_ORDER,
        "response.output_text.delta",
        *TEXT_END,
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = payloads[-1]["response"]
    assert final["id"] == "resp_abc" and final["status"] == "completed"
    message, call = final["output"]
    assert message["content"][0]["text"] == "Let me check. " and message["status"] == "completed"
    assert call == {**call, "type": "function_call", "call_id": "call_1", "arguments": '{"a":1}'}
    assert [p.get("output_index") for p in payloads[2:4]] == [0, 0]
    assert payloads[9]["output_index"] == 1  # the call is the second item
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 3
    assert final["usage"]["total_tokens"] == 16
    # The item announced by output_item.added is as it was then, not as it ended.
    assert payloads[2]["item"]["content"] == [] and payloads[2]["item"]["status"] == "in_progress"
    # A second stream.started (a stream another replica took over) starts nothing new.
    assert (
        rendered(meta, [*events[:2], StreamStarted(id="abc", model="m", created=1)])[-1]["type"]
        == "response.output_text.delta"
    )
    # Rendering again (a resume, on any replica) gives the very same payloads.
    assert rendered(meta, events) == payloads


def test_renderer_ends_truncated_failed_and_cancelled_responses() -> None:
    meta = meta_for({"background": True})
    start = [StreamStarted(id="abc", model="m", created=1), TextDelta(text="Once")]
    truncated = rendered(meta, [*start, StreamCompleted(finish_reason="length")])
    assert truncated[0]["response"]["status"] == "queued"  # background: queued, then running
    assert truncated[1]["response"]["status"] == "in_progress"
    assert truncated[-1]["type"] == "response.incomplete"
    assert truncated[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert truncated[-2]["item"]["status"] == "incomplete"
    filtered = rendered(meta, [*start, StreamCompleted(finish_reason="content_filter")])
    assert filtered[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}
    error = {"type": "backend_unavailable", "message": "upstream down", "code": None}
    failed = rendered(meta, [*start, StreamFailed(error=error)])
    assert [p["type"] for p in failed[-5:]] == ["error", *TEXT_END, "response.failed"]
    assert failed[-5]["message"] == "upstream down"
    assert failed[-1]["response"]["error"]["message"] == "upstream down"
    assert failed[-1]["response"]["output"][0]["content"][0]["text"] == "Once"  # kept
    cancelled = rendered(meta, [*start, StreamCancelled(reason="stop")])
    assert cancelled[-1]["type"] == "response.cancelled"
    assert cancelled[-1]["response"]["status"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi", "frequency_penalty": 1}, "frequency_penalty"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input.0.content.0.type",
        ),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": "hi", "background": True, "store": False}, "background"),
        ({"input": "hi", "truncation": "auto"}, "truncation"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
    ],
)
def test_unsupported_fields_are_refused_by_name(body: dict[str, Any], param: str) -> None:
    from tokenwire.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:
        build(parse_body({"model": "m", **body}))
    assert caught.value.param == param


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELD_NAMES = st.sampled_from(
    ["model", "input", "instructions", "tools", "tool_choice", "text", "metadata", "seed",
     "max_output_tokens", "temperature", "top_p", "store", "background", "user", "include",
     "reasoning", "stream_options", "parallel_tool_calls"]
)  # fmt: skip


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.dictionaries(_FIELD_NAMES, _json, max_size=6), _json)
def test_parse_raises_nothing_but_invalid_request(fields: dict[str, Any], input_: Any) -> None:
    from tokenwire.errors import InvalidRequest

    for body in ({"model": "m", "input": input_, **fields}, fields, input_):
        with contextlib.suppress(InvalidRequest):
            PROTOCOL.parse(body)


# -- the official SDK, streaming ------------------------------------------------------------

#: A question the model answers briefly and completely (greedy).
SHORT = {"input": "What is the capital of France? Answer in one sentence.", "temperature": 0}


def test_sdk_stream_helper_events_snapshots_and_final_response(server: RunningServer) -> None:
    client = client_for(server)
    with client.responses.stream(model="default", max_output_tokens=200, **SHORT) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert_text_order(types)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 3  # token by token, not one blob
    assert deltas[-1].snapshot == "".join(d.delta for d in deltas)  # the helper's snapshot
    assert final.output_text == deltas[-1].snapshot and "Paris" in final.output_text
    assert final.id.startswith("resp_") and final.status == "completed"
    assert final.usage is not None and 0 < final.usage.output_tokens <= 200
    assert final.usage.input_tokens > 0
    assert {e.item_id for e in deltas} == {final.output[0].id}
    assert events[0].response.id == final.id == events[-1].response.id


def test_raw_sse_ids_names_and_heartbeats(server: RunningServer) -> None:
    body = {"model": "default", "stream": True, "max_output_tokens": 12, **LONG}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60) as response:
        raw = b"".join(response.iter_bytes())
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-stream-id"]
    frames, _ = parse_frames(raw)
    payloads = [json.loads(f.data) for f in frames]
    assert [f.id for f in frames] == [p["sequence_number"] for p in payloads]
    assert [f.id for f in frames] == list(range(len(frames)))
    assert [f.event for f in frames] == [p["type"] for p in payloads]
    assert payloads[-1]["type"] == "response.incomplete"
    assert payloads[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert payloads[-1]["response"]["output"][0]["status"] == "incomplete"
    assert all(p["logprobs"] == [] for p in payloads if p["type"].endswith("text.delta"))


def test_async_sdk_create_stream_and_non_streaming(server: RunningServer) -> None:
    async def run() -> tuple[list[Any], Any]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
        stream = await client.responses.create(
            model="default",
            stream=True,
            max_output_tokens=200,
            **SHORT,  # type: ignore[arg-type]
        )
        events = [event async for event in stream]
        whole = await client.responses.create(model="default", max_output_tokens=200, **SHORT)
        return events, whole

    events, whole = asyncio.run(run())
    assert_text_order([e.type for e in events])
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert whole.output_text == streamed  # greedy: the same answer either way
    assert whole.status == "completed" and whole.object == "response"
    assert whole.output[0].type == "message" and whole.output[0].status == "completed"


class City(pydantic.BaseModel):
    name: str
    country: str


def test_parse_with_text_format(server: RunningServer) -> None:
    client = client_for(server)
    parsed = client.responses.parse(
        model="default",
        input="Name one big city in Japan as JSON.",
        text_format=City,
        temperature=0,
        max_output_tokens=60,
    )
    assert isinstance(parsed.output_parsed, City)
    assert parsed.text is not None and parsed.text.format.type == "json_schema"


def test_truncation_is_incomplete_with_partial_output(server: RunningServer) -> None:
    client = client_for(server)
    response = client.responses.create(model="default", max_output_tokens=8, **LONG)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text and response.usage is not None
    assert response.usage.output_tokens == 8


class GetWeather(pydantic.BaseModel):
    """Get the current weather for a city."""

    city: str = pydantic.Field(max_length=30)


def test_tool_round_trip_with_previous_response_id(server: RunningServer) -> None:
    client = client_for(server)
    tools: list[Any] = [
        {
            "type": "function",
            "name": "GetWeather",
            "parameters": GetWeather.model_json_schema(),
            "strict": True,
        }
    ]
    with client.responses.stream(
        model="default",
        input="What's the weather in Paris?",
        tools=tools,
        tool_choice="required",
        temperature=0.3,
        extra_body={"seed": 5},
        max_output_tokens=60,
    ) as stream:
        events = list(stream)
        first = stream.get_final_response()
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].name == "GetWeather"
    call = first.output[-1]
    assert call.type == "function_call" and call.status == "completed"
    assert json.loads(call.arguments)["city"]
    second = client.responses.create(
        model="default",
        previous_response_id=first.id,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": json.dumps({"sky": "sunny", "temperature_c": 21}),
            }
        ],
        tools=tools,
        temperature=0,
        max_output_tokens=40,
    )
    assert second.previous_response_id == first.id
    assert second.output_text
    # The second turn saw the first one: its prompt is longer than the question alone.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    items = client.responses.input_items.list(second.id)
    assert [item.type for item in items.data] == ["function_call_output"]


def test_previous_response_id_continues_the_conversation(server: RunningServer) -> None:
    client = client_for(server)
    first = client.responses.create(
        model="default",
        instructions="You are terse.",
        input="My name is Zanzibar. Say OK.",
        temperature=0,
        max_output_tokens=10,
    )
    second = client.responses.create(
        model="default",
        previous_response_id=first.id,
        input="What is my name?",
        temperature=0,
        max_output_tokens=20,
    )
    assert "Zanzibar" in second.output_text
    assert second.instructions is None  # instructions are not carried over
    # The prompt cache makes turn 2 cheap: its prefix (turn 1) was decoded already.
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens > 0
    listed = client.responses.input_items.list(first.id, order="asc")
    assert [item.type for item in listed.data] == ["message"]
    assert listed.data[0].content[0].text == "My name is Zanzibar. Say OK."  # type: ignore[union-attr]


# -- background mode ------------------------------------------------------------------------


def wait_status(client: openai.OpenAI, response_id: str, statuses: set[str]) -> Any:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status in statuses:
            return response
        time.sleep(0.1)
    raise TimeoutError(f"{response_id} never reached {statuses}")


def test_background_poll_resume_after_n_and_exact_replay(server: RunningServer) -> None:
    client = client_for(server)
    started = client.responses.create(
        model="default", background=True, max_output_tokens=30, **LONG
    )
    assert started.status in ("queued", "in_progress") and started.background is True
    done = wait_status(client, started.id, {"completed", "incomplete"})
    assert done.status == "incomplete" and done.output_text
    with client.responses.stream(response_id=started.id) as stream:
        whole = list(stream)
    with client.responses.stream(response_id=started.id, starting_after=5) as stream:
        rest = list(stream)
    assert [e.sequence_number for e in rest] == list(range(6, len(whole)))
    assert [e.model_dump() for e in rest] == [e.model_dump() for e in whole[6:]]
    # The raw GET with starting_after sends only what follows (the SDK filters itself).
    url = f"{server.url}/v1/responses/{started.id}?stream=true&starting_after=5"
    with httpx.stream("GET", url, timeout=60) as response:
        frames, _ = parse_frames(b"".join(response.iter_bytes()))
    assert [f.id for f in frames] == list(range(6, len(whole)))
    text = "".join(e.delta for e in whole if e.type == "response.output_text.delta")
    assert text == done.output_text


def test_background_cancel_mid_generation_ends_every_reader(server: RunningServer) -> None:
    client = client_for(server)
    started = client.responses.create(model="default", background=True, stream=False, **LONG)
    live: list[Any] = []

    def follow() -> None:
        with client.responses.stream(response_id=started.id) as stream:
            live.extend(stream)

    import threading

    reader = threading.Thread(target=follow)
    reader.start()
    deadline = time.monotonic() + 60
    while not any(e.type == "response.output_text.delta" for e in live):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.output_text
    reader.join(timeout=30)
    assert not reader.is_alive()  # the live reader got its terminal event: no hang
    # The SDK has no type for this terminal event: it passes it on by its type, with the
    # Response as a plain dict.
    assert live[-1].type == "response.cancelled"
    assert live[-1].response["status"] == "cancelled"  # type: ignore[index,union-attr]
    # Decoding stopped: the stored text is the cancelled object's, and stays so.
    time.sleep(0.5)
    again = client.responses.cancel(started.id)  # idempotent
    assert again.status == "cancelled" and again.output_text == cancelled.output_text
    assert client.responses.retrieve(started.id).output_text == cancelled.output_text
    # A resumed reader after the end gets the whole log and the terminal event too.
    with client.responses.stream(response_id=started.id, starting_after=3) as stream:
        assert list(stream)[-1].type == "response.cancelled"


def test_a_dropped_foreground_stream_stops_and_a_background_one_goes_on(
    server: RunningServer,
) -> None:
    client = client_for(server)
    ids = {}
    for background in (False, True):
        body = {"model": "default", "stream": True, "background": background, **LONG}
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60) as r:
            buffer = b""
            for chunk in r.iter_raw():
                buffer += chunk
                if buffer.count(b"response.output_text.delta") >= 3:
                    break  # the client goes away mid-generation
            ids[background] = "resp_" + r.headers["x-stream-id"]
    dropped = wait_status(client, ids[False], {"cancelled", "completed", "incomplete"})
    assert dropped.status == "cancelled"  # disconnect grace 0: decoding stopped at once
    kept = client.responses.retrieve(ids[True])
    assert kept.status == "in_progress"  # nobody reads it, and it goes on
    client.responses.delete(ids[True])  # a running one is cancelled, then forgotten
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[True])


def test_cancel_and_resume_refusals_delete_and_404s(server: RunningServer) -> None:
    client = client_for(server, max_retries=0)
    foreground = client.responses.create(model="default", max_output_tokens=5, **LONG)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(foreground.id)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.retrieve(foreground.id, stream=True)
    finished = client.responses.create(
        model="default", background=True, max_output_tokens=5, **LONG
    )
    wait_status(client, finished.id, {"incomplete"})
    with pytest.raises(openai.BadRequestError, match="status 'incomplete'"):
        client.responses.cancel(finished.id)
    assert client.responses.retrieve(foreground.id).output_text == foreground.output_text
    client.responses.delete(foreground.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(foreground.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")
    unstored = client.responses.create(model="default", store=False, max_output_tokens=3, **LONG)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model="default", input="hi", previous_response_id=unstored.id, max_output_tokens=3
        )


def test_bad_requests_are_400s_the_sdk_does_not_retry(server: RunningServer) -> None:
    bad = {"model": "default", "input": "hi", "frequency_penalty": 1.0}
    response = httpx.post(f"{server.url}/v1/responses", json=bad, timeout=30)
    assert response.status_code == 400
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["param"] == "frequency_penalty"
    missing = httpx.post(
        f"{server.url}/v1/responses", json={"model": "nope", "input": "hi"}, timeout=30
    )
    assert missing.status_code == 404 and missing.headers["x-should-retry"] == "false"
    assert missing.json()["error"]["code"] == "model_not_found"
    client = client_for(server)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="default", input=[{"type": "input_image"}])  # type: ignore[list-item]


# -- ownership --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[RunningServer]:
    with tokenwire_server(
        "--disconnect-grace", "0", "--api-keys", "key-a,key-b", "--stream-ttl", "3"
    ) as running:  # fmt: skip
        yield running


def test_a_response_belongs_to_its_key(keyed_server: RunningServer) -> None:
    a = client_for(keyed_server).with_options(api_key="key-a")
    b = client_for(keyed_server).with_options(api_key="key-b", max_retries=0)
    mine = a.responses.create(model="default", background=True, max_output_tokens=5, **LONG)
    for call in (
        lambda: b.responses.retrieve(mine.id),
        lambda: b.responses.cancel(mine.id),
        lambda: b.responses.delete(mine.id),
        lambda: b.responses.input_items.list(mine.id),
        lambda: b.responses.create(
            model="default", input="hi", previous_response_id=mine.id, max_output_tokens=3
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert wait_status(a, mine.id, {"incomplete"}).output_text
    time.sleep(3.5)  # past --stream-ttl: gone, and said the way OpenAI says it
    with pytest.raises(openai.NotFoundError):
        a.with_options(max_retries=0).responses.retrieve(mine.id)


# -- WebSocket mode ---------------------------------------------------------------------------


def test_websocket_mode_with_the_sdk(server: RunningServer) -> None:
    async def run() -> tuple[list[Any], list[Any], list[Any]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
        async with client.responses.connect() as connection:
            await connection.response.create(model="default", input="x", background=True)
            refused = await connection.recv()
            assert refused.type == "error" and refused.status == 400  # type: ignore[union-attr]
            assert refused.error.param == "background"  # type: ignore[union-attr]
            await connection.response.create(
                model="default",
                input="My name is Zanzibar. Say OK.",
                store=False,
                temperature=0,
                max_output_tokens=10,
            )
            first = await until_terminal(connection)
            await connection.response.create(
                model="default",
                input="What is my name?",
                previous_response_id=first[-1].response.id,
                temperature=0,
                max_output_tokens=20,
                stream_id="lane-2",
            )
            second: list[Any] = []
            busy: list[Any] = []
            async for event in connection:
                second.append(event)
                if event.type == "response.output_text.delta" and not busy:
                    # A second create while one is in flight is refused, not queued.
                    await connection.response.create(model="default", input="x")
                    busy.append(None)
                elif event.type == "error":
                    busy.append(event)
                if event.type in ("response.completed", "response.incomplete"):
                    break
            return first, second, busy

    async def until_terminal(connection: Any) -> list[Any]:
        events = []
        async for event in connection:
            events.append(event)
            if event.type in ("response.completed", "response.incomplete", "response.failed"):
                return events
        raise AssertionError("the connection closed first")

    first, second, busy = asyncio.run(run())
    assert [e.sequence_number for e in first] == list(range(len(first)))
    assert first[0].type == "response.created"
    second_events = [e for e in second if e.type != "error"]
    assert all(getattr(e, "stream_id", None) == "lane-2" for e in second_events)
    text = "".join(e.delta for e in second_events if e.type == "response.output_text.delta")
    assert "Zanzibar" in text
    assert busy[-1].type == "error" and "in progress" in busy[-1].error.message


# -- other backends -------------------------------------------------------------------------


def test_through_an_upstream_and_a_failure_mid_stream(server: RunningServer) -> None:
    from .scripted import ScriptedBackend, serve_app_in_thread

    upstream = [f"tw={server.url}/v1"]
    with serve_app_in_thread(None, no_embedded=True, upstream=upstream) as url:
        gateway = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with gateway.responses.stream(model="default", max_output_tokens=200, **SHORT) as stream:
            types = [event.type for event in stream]
            final = stream.get_final_response()
    assert_text_order(types)
    assert "Paris" in final.output_text and final.usage is not None
    backend = ScriptedBackend(pieces=["Once", " upon", " a", " time"], fail_after=2)
    with serve_app_in_thread(backend, disconnect_grace=0) as url:
        scripted = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        events = list(scripted.responses.create(model="scripted", input="hi", stream=True))
        whole = httpx.post(
            f"{url}/v1/responses", json={"model": "scripted", "input": "hi"}, timeout=30
        )
    assert [e.type for e in events[-5:]] == ["error", *TEXT_END, "response.failed"]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None
    assert "scripted failure" in failed.error.message
    assert failed.output_text == "Once upon"  # the partial output is kept
    assert whole.status_code == 502 and whole.headers["x-should-retry"] == "false"
    # A guard that fires ends the response incomplete, for content_filter, text kept.
    guarded = ScriptedBackend(pieces=["My number", " is 555-12-3456", " ok"])
    with serve_app_in_thread(guarded, guard=[r"ssn=\d{3}-\d{2}-\d{4}"]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        filtered = client.responses.create(model="scripted", input="hi")
    assert filtered.status == "incomplete" and filtered.incomplete_details is not None
    assert filtered.incomplete_details.reason == "content_filter"
    assert filtered.output_text.startswith("My number") and "3456" not in filtered.output_text
