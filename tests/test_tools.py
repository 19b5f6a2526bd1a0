"""Tool calls: buffering and validation, the server-side tool loop, the embedded model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tokenwire.backends.base import Backend
from tokenwire.cancel import CancelToken
from tokenwire.events import (
    Event,
    Progress,
    StreamCompleted,
    StreamFailed,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    Usage,
)
from tokenwire.requests import ChatRequest, Tool
from tokenwire.stages.tools import buffer_tool_calls
from tokenwire.streams import Stage
from tokenwire.tools import ToolLoop, ToolRegistry, load_tools

from .conftest import RunningServer, tokenwire_server
from .stage_support import EventScript, chat, run_stream, text_events

WEATHER = Tool(
    name="get_weather",
    description="Weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
        "additionalProperties": False,
    },
)


def call_events(name: str, *deltas: str, call_id: str = "call_1") -> list[Event]:
    return [
        ToolCallStarted(index=0, id=call_id, name=name),
        *(ToolCallDelta(index=0, arguments_delta=d) for d in deltas),
        Usage(prompt_tokens=7, completion_tokens=len(deltas)),
        StreamCompleted(finish_reason="stop"),
    ]


# -- registry --------------------------------------------------------------------------------


def test_tool_decorator_derives_schema_from_signature() -> None:
    registry = ToolRegistry()

    @registry.tool(timeout=2.0)
    def convert(amount: float, currency: str = "EUR") -> str:
        """Convert an amount.

        Longer text that is not part of the description."""
        return f"{amount} {currency}"

    spec = registry.get("convert")
    assert spec is not None and spec.timeout == 2.0
    assert spec.description == "Convert an amount."
    assert spec.parameters["properties"]["amount"]["type"] == "number"
    assert spec.parameters["required"] == ["amount"]
    assert spec.function(amount="2.5") == "2.5 EUR"  # validated and coerced by pydantic
    with pytest.raises(pydantic.ValidationError):
        spec.function(amount="lots")


def test_load_tools_from_module_reference() -> None:
    loaded = load_tools(["tests.tool_fixtures:tools"])
    assert [spec.name for spec in loaded] == ["get_weather"]


# -- buffering and validation (scripted backend) ---------------------------------------------


@pytest.mark.anyio
async def test_deltas_stream_then_completed_after_validation() -> None:
    backend = EventScript(steps=[call_events("get_weather", '{"ci', 'ty": "Pa', 'ris"}')])
    events = await run_stream(backend, chat(tools=[WEATHER]), [buffer_tool_calls])
    kinds = [e.type for e in events if e.type.startswith("tool_call")]
    assert kinds == ["tool_call.started", *["tool_call.delta"] * 3, "tool_call.completed"]
    completed = next(e for e in events if isinstance(e, ToolCallCompleted))
    assert completed.arguments == '{"city": "Paris"}'
    assert completed.id == "call_1" and completed.name == "get_weather"
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "tool_calls"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("deltas", "code", "path", "pulled"),
    [
        # not JSON: fails at the delta with the bad character, nothing after it is pulled
        (['{"city": ', "Paris}", '"x"}', "}"], "invalid_tool_arguments", "$.city", 3),
        # wrong type, seen at the value's first character
        (['{"city": ', "12", "}"], "invalid_tool_arguments", "$.city", 3),
        # an argument the schema does not allow
        (['{"cit', 'y": "P", "when"', ': "now"}'], "invalid_tool_arguments", "$.when", 3),
        # missing required argument, seen when the object closes
        (['{"days"', ": 2}"], "invalid_tool_arguments", "$", 3),
    ],
)
async def test_malformed_arguments_fail_with_the_path(
    deltas: list[str], code: str, path: str, pulled: int
) -> None:
    backend = EventScript(steps=[call_events("get_weather", *deltas)])
    events = await run_stream(backend, chat(tools=[WEATHER]), [buffer_tool_calls])
    failed = events[-1]
    assert isinstance(failed, StreamFailed), events
    assert failed.error["type"] == "output_validation_error"
    assert failed.error["code"] == code
    assert failed.error["path"] == path
    assert "get_weather" in failed.error["message"]
    assert not any(isinstance(e, ToolCallCompleted) for e in events)
    assert backend.yielded == [pulled] and backend.closed == [True]


@pytest.mark.anyio
async def test_unknown_function_fails() -> None:
    backend = EventScript(steps=[call_events("rm_rf", "{}")])
    events = await run_stream(backend, chat(tools=[WEATHER]), [buffer_tool_calls])
    assert isinstance(events[-1], StreamFailed) and events[-1].error["code"] == "unknown_tool"


# -- the server-side loop (scripted backend, real ToolLoop) ----------------------------------


def loop_stages(backend: Backend, registry: ToolRegistry, **options: Any) -> list[Stage]:
    def open_step(request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        return buffer_tool_calls(backend.stream(request, cancel), request, cancel)

    return [buffer_tool_calls, ToolLoop(registry, open_step, progress_interval=0.2, **options)]


@pytest.fixture
def registry() -> Iterator[ToolRegistry]:
    tools = ToolRegistry()

    @tools.tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @tools.tool
    def boom() -> str:
        raise RuntimeError("the tool broke")

    @tools.tool(timeout=0.3)
    def slow() -> str:
        time.sleep(1.0)
        return "late"

    @tools.tool
    async def async_echo(text: str) -> dict[str, str]:
        await asyncio.sleep(0.01)
        return {"echo": text}

    yield tools


def tool_messages(request: ChatRequest) -> list[str]:
    return [m.content for m in request.messages if m.role == "tool"]


@pytest.mark.anyio
async def test_loop_runs_tool_and_streams_final_answer(registry: ToolRegistry) -> None:
    backend = EventScript(
        steps=[call_events("add", '{"a": 2,', ' "b": 3}'), text_events("The sum", " is 5.")]
    )
    events = await run_stream(backend, chat("2+3?"), loop_stages(backend, registry))
    # The server's own call stays internal: progress shows it, no tool_call events leak.
    assert not any(e.type.startswith("tool_call") for e in events)
    tool_progress = [e.message for e in events if isinstance(e, Progress) and e.stage == "tool"]
    assert tool_progress[0] == "add started" and tool_progress[-1].startswith("add finished")
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    last_tool = max(
        i for i, e in enumerate(events) if isinstance(e, Progress) and e.stage == "tool"
    )
    assert last_tool < first_text
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "The sum is 5."
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "stop"
    usage = [e for e in events if isinstance(e, Usage)]
    assert len(usage) == 1 and usage[0].prompt_tokens == 7 + 5  # summed over both steps
    # The model got the server tools offered and the result as a tool message.
    first, second = backend.requests
    assert {t.name for t in first.tools} == {"add", "boom", "slow", "async_echo"}
    assert tool_messages(second) == ["5"]
    assistant = second.messages[-2]
    assert assistant.tool_calls[0].name == "add" and assistant.tool_calls[0].id == "call_1"
    # One tool.result per call, for wires that show server-run tools (UI message stream).
    (result,) = [e for e in events if isinstance(e, ToolResult)]
    assert (result.id, result.name, result.output, result.error) == ("call_1", "add", "5", False)
    assert json.loads(result.arguments) == {"a": 2, "b": 3}
    assert events.index(result) < first_text


@pytest.mark.anyio
async def test_tool_errors_timeouts_and_bad_arguments_go_back_to_the_model(
    registry: ToolRegistry,
) -> None:
    backend = EventScript(
        steps=[
            call_events("boom", "{}"),
            call_events("slow", ""),
            call_events("add", '{"a": "two"'),  # invalid: fails at the first bad character
            call_events("async_echo", '{"text": "hi"}'),
            text_events("done"),
        ]
    )
    events = await run_stream(backend, chat(), loop_stages(backend, registry, max_steps=5))
    assert isinstance(events[-1], StreamCompleted), events[-1]
    results = tool_messages(backend.requests[-1])
    assert results[0] == "error: RuntimeError: the tool broke"
    assert results[1] == "error: slow timed out after 0.3s"
    assert results[2].startswith("error: invalid arguments:") and "$.a" in results[2]
    assert results[3] == '{"echo": "hi"}'
    messages = [e.message for e in events if isinstance(e, Progress) and e.stage == "tool"]
    assert any(m.startswith("boom failed") for m in messages)
    assert "slow timed out after 0.3s" in messages
    assert "add: invalid arguments" in messages
    failed = [(e.name, e.error) for e in events if isinstance(e, ToolResult)]
    assert failed == [("boom", True), ("slow", True), ("add", True), ("async_echo", False)]
    # The invalid call was cut off at the bad character: its step was closed early.
    assert backend.closed[2] is True


@pytest.mark.anyio
async def test_max_steps_forces_a_text_answer_then_fails(registry: ToolRegistry) -> None:
    backend = EventScript(steps=[call_events("add", '{"a": 1, "b": 1}')])
    events = await run_stream(backend, chat(), loop_stages(backend, registry, max_steps=2))
    assert isinstance(events[-1], StreamFailed)
    assert events[-1].error["code"] == "max_tool_steps"
    assert len(backend.requests) == 3
    assert backend.requests[-1].tool_choice == "none"  # the last step asked for text


@pytest.mark.anyio
async def test_stop_during_a_tool_run_cancels(registry: ToolRegistry) -> None:
    from tokenwire.journal.memory import MemoryJournal
    from tokenwire.router import Router
    from tokenwire.streams import StreamManager

    @registry.tool
    def hang() -> str:
        time.sleep(2.0)
        return "never used"

    backend = EventScript(steps=[call_events("hang", "{}"), text_events("no")])
    manager = StreamManager(Router(backend), MemoryJournal(), stages=loop_stages(backend, registry))
    await manager.start_background()
    meta = await manager.start(chat(), protocol="native")
    seen = []
    async for event in manager.read(meta.id):
        seen.append(event)
        if isinstance(event, Progress) and event.message == "hang started":
            await manager.cancel(meta.id)
    await manager.close()
    assert seen[-1].type == "stream.cancelled"
    assert len(backend.requests) == 1  # the model was not asked again


# -- the embedded model ----------------------------------------------------------------------


class GetWeather(pydantic.BaseModel):
    """Get the current weather for a city."""

    city: str = pydantic.Field(max_length=30)


@pytest.mark.timeout(300)
def test_embedded_tool_call_for_openai_clients(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    with client.chat.completions.stream(
        model="default",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        seed=5,
        temperature=0.3,
        max_tokens=60,
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(deltas) >= 2  # the arguments streamed in pieces
    assert len(done) == 1 and done[0].name == "GetWeather"
    assert isinstance(done[0].parsed_arguments, GetWeather)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].id.startswith("call_")


@pytest.mark.timeout(300)
def test_embedded_tool_call_native_events_and_non_streaming(server: RunningServer) -> None:
    tools = [
        {"type": "function", "function": {"name": WEATHER.name, "parameters": WEATHER.parameters}}
    ]
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Weather in Oslo for 2 days?"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "seed": 9,
        "temperature": 0.3,
        "max_tokens": 60,
    }
    events = []
    with httpx.stream("POST", f"{server.url}/v1/streams", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    kinds = [e["type"] for e in events]
    started = kinds.index("tool_call.started")
    completed = kinds.index("tool_call.completed")
    assert started < kinds.index("tool_call.delta") < completed
    assert "text.delta" not in kinds
    arguments = "".join(e["arguments_delta"] for e in events if e["type"] == "tool_call.delta")
    assert events[completed]["arguments"] == arguments
    jsonschema.validate(json.loads(arguments), WEATHER.parameters)
    assert events[-1] == {**events[-1], "type": "stream.completed", "finish_reason": "tool_calls"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    message = response.json()["choices"][0]["message"]
    assert response.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["city"]


@pytest.fixture(scope="module")
def tool_server() -> Iterator[RunningServer]:
    with tokenwire_server(
        "--disconnect-grace", "0", "--tools", "tests.tool_fixtures:tools", "--max-tool-steps", "2"
    ) as running:
        yield running


@pytest.mark.timeout(600)
def test_server_side_tool_loop_end_to_end(tool_server: RunningServer) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "What is the weather in Rome?"}],
        "tool_choice": "required",
        "seed": 2,
        "temperature": 0.3,
        "max_tokens": 40,
    }
    events = []
    with httpx.stream("POST", f"{tool_server.url}/v1/streams", json=body, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    tool = [e for e in events if e["type"] == "progress" and e["stage"] == "tool"]
    messages = [e["message"] for e in tool]
    assert messages[0] == "get_weather started"
    assert any("elapsed" in m for m in messages)  # the fixture tool takes 1.3 s
    assert "get_weather finished in" in messages[-1]
    assert tool[0]["fraction"] == 0.0 and tool[-1]["fraction"] == 1.0
    kinds = [e["type"] for e in events]
    assert not any(k.startswith("tool_call") for k in kinds)
    last_tool_seq = tool[-1]["seq"]
    texts = [e for e in events if e["type"] == "text.delta"]
    assert texts and all(e["seq"] > last_tool_seq for e in texts)  # the final answer streams
    assert events[-1]["type"] == "stream.completed"
    assert events[-1]["finish_reason"] in ("stop", "length")
    usage = [e for e in events if e["type"] == "usage"]
    assert len(usage) == 1 and usage[0]["completion_tokens"] > len(texts)  # both steps


# -- the embedded backend's grammar helpers (no model needed) --------------------------------


async def collect(events: list[Event], request: ChatRequest) -> list[Event]:
    from tokenwire.backends.grammar import tool_call_events

    async def source() -> AsyncIterator[Event]:
        for event in events:
            yield event

    return [event async for event in tool_call_events(source(), request)]


@pytest.mark.anyio
async def test_constrained_call_text_becomes_tool_call_events() -> None:
    pieces = ['{"name": "get_', 'weather", "argu', 'ments": {"ci', 'ty": "Rome"}', "}"]
    out = await collect(text_events(*pieces), chat(tools=[WEATHER], tool_choice="required"))
    assert [e.type for e in out if e.type != "usage"] == [
        "tool_call.started",
        "tool_call.delta",
        "tool_call.delta",
        "stream.completed",
    ]
    started = out[0]
    assert isinstance(started, ToolCallStarted) and started.name == "get_weather"
    arguments = "".join(e.arguments_delta for e in out if isinstance(e, ToolCallDelta))
    assert json.loads(arguments) == {"city": "Rome"}
    assert isinstance(out[-1], StreamCompleted) and out[-1].finish_reason == "tool_calls"


@pytest.mark.anyio
async def test_auto_mode_text_answer_passes_through() -> None:
    # Leading whitespace is text: the call branch of the grammar starts with "{".
    out = await collect(text_events(" ", '{"name"', " x"), chat(tools=[WEATHER]))
    assert [e.text for e in out if isinstance(e, TextDelta)] == [" ", '{"name"', " x"]
    assert not any(e.type.startswith("tool_call") for e in out)
    assert isinstance(out[-1], StreamCompleted) and out[-1].finish_reason == "stop"


def test_grammar_and_prompt_for_tools() -> None:
    from tokenwire.backends.grammar import gbnf_for, prompt_messages
    from tokenwire.errors import InvalidRequest
    from tokenwire.requests import Message, ToolCall

    auto = gbnf_for(chat(tools=[WEATHER]))
    assert auto is not None and auto.startswith("root ::= call | text")
    forced = gbnf_for(chat(tools=[WEATHER], tool_choice="required"))
    assert forced is not None and "text ::=" not in forced and '"\\"get_weather\\""' in forced
    assert gbnf_for(chat(tools=[WEATHER], tool_choice="none")) is None
    with pytest.raises(InvalidRequest):
        gbnf_for(chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}))
    request = chat("Rome?", tools=[WEATHER])
    request.messages += [
        Message(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="c1", name="get_weather", arguments='{"city": "Rome"}')],
        ),
        Message(role="tool", content="sunny", tool_call_id="c1"),
    ]
    messages = prompt_messages(request)
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {
        "name": "get_weather",
        "arguments": {"city": "Rome"},
    }
    assert messages[3] == {"role": "tool", "content": "sunny"}


@pytest.mark.anyio
async def test_json_response_format_requests_skip_the_tool_loop(registry: ToolRegistry) -> None:
    backend = EventScript(steps=[text_events('{"a": 1}')])
    events = await run_stream(backend, chat(json_object=True), loop_stages(backend, registry))
    assert isinstance(events[-1], StreamCompleted)
    assert backend.requests[0].tools == []  # no server tools offered


@pytest.mark.anyio
async def test_client_tool_calls_pass_through_the_loop(registry: ToolRegistry) -> None:
    backend = EventScript(steps=[call_events("get_weather", '{"city": "Oslo"}')])
    request = chat(tools=[WEATHER])
    events = await run_stream(backend, request, loop_stages(backend, registry))
    kinds = [e.type for e in events if e.type.startswith("tool_call")]
    assert kinds == ["tool_call.started", "tool_call.delta", "tool_call.completed"]
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "tool_calls"
    assert len(backend.requests) == 1


@pytest.mark.anyio
async def test_tool_call_with_json_format_is_not_an_incomplete_json_error() -> None:
    from tokenwire.stages.structured import structured_output

    backend = EventScript(steps=[call_events("get_weather", '{"city": "Oslo"}')])
    request = chat(tools=[WEATHER], json_object=True)
    events = await run_stream(backend, request, [buffer_tool_calls, structured_output])
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "tool_calls"
