"""Structured output: progressive validation (stage), grammar-constrained embedded model."""

from __future__ import annotations

import itertools
import json
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tokenwire.errors import OutputValidationError
from tokenwire.events import JsonPartial, StreamCompleted, StreamFailed, TextDelta
from tokenwire.stages.structured import SchemaStream, compile_schema, structured_output

from .conftest import RunningServer
from .stage_support import EventScript, chat, run_stream, text_events

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
INVENTORY = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "count": {"type": "integer"},
                    "fragile": {"type": "boolean"},
                },
                "required": ["sku", "count", "fragile"],
                "additionalProperties": False,
            },
        },
        "note": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
    },
    "required": ["items", "note"],
    "additionalProperties": False,
}
VERDICT = {
    "$defs": {"level": {"enum": ["low", "medium", "high"]}},
    "type": "object",
    "properties": {"risk": {"$ref": "#/$defs/level"}, "ok": {"type": "boolean"}},
    "required": ["risk", "ok"],
    "additionalProperties": False,
}


def check(schema: dict[str, Any], text: str) -> tuple[str, str, int]:
    """Feed ``text`` one character at a time; return (code, path, index of the bad char)."""
    stream = SchemaStream(compile_schema(schema, param="schema"))
    for index, char in enumerate(text):
        try:
            stream.feed(char)
        except OutputValidationError as exc:
            return exc.code or "", exc.path, index
    try:
        stream.close()
    except OutputValidationError as exc:
        return exc.code or "", exc.path, len(text)
    return "ok", "", -1


@pytest.mark.parametrize(
    ("schema", "text", "code", "path", "at"),
    [
        (PERSON, '{"name": "Al", "age": 3, "color": "red"}', "ok", "", -1),
        # enum: fails at the first character no allowed value can continue with
        (PERSON, '{"name": "Al", "color": "pink"}', "json_schema_violation", "$.color", 25),
        # type: at the value's first character
        (PERSON, '{"name": 42}', "json_schema_violation", "$.name", 9),
        # additionalProperties: as soon as the key is complete
        (PERSON, '{"nick": "x"}', "json_schema_violation", "$.nick", 6),
        # maxLength: at the character that exceeds it
        (PERSON, '{"name": "' + "x" * 30 + '"}', "json_schema_violation", "$.name", 34),
        # required: when the object closes
        (PERSON, '{"name": "Al", "age": 3}', "json_schema_violation", "$", 23),
        # integer: when the number completes
        (PERSON, '{"age": 2.5,', "json_schema_violation", "$.age", 11),
        # nested arrays and objects
        (
            INVENTORY,
            '{"items": [{"sku": "a", "count": "3"',
            "json_schema_violation",
            "$.items[0].count",
            33,
        ),
        (INVENTORY, '{"items": [{}, {}, {}, {}]}', "json_schema_violation", "$.items[0]", 12),
        (INVENTORY, '{"items": [1', "json_schema_violation", "$.items[0]", 11),
        (INVENTORY, '{"items": [], "note": 5}', "json_schema_violation", "$.note", 22),
        # $ref
        (VERDICT, '{"risk": "hx', "json_schema_violation", "$.risk", 11),
        # syntax
        (PERSON, '{"name": "Al",}', "invalid_json", "$", 14),
        (PERSON, '{"name": "Al"', "incomplete_json", "$", 13),
    ],
)
def test_violations_are_caught_at_the_first_bad_character(
    schema: dict[str, Any], text: str, code: str, path: str, at: int
) -> None:
    assert check(schema, text) == (code, path, at)


def test_max_items_is_checked_when_the_extra_item_starts() -> None:
    code, path, at = check(
        INVENTORY, '{"items": [' + ", ".join(['{"sku": "a", "count": 1, "fragile": true}'] * 4)
    )
    assert (code, path) == ("json_schema_violation", "$.items[3]")
    assert at == len(
        '{"items": [' + ", ".join(['{"sku": "a", "count": 1, "fragile": true}'] * 3) + ", "
    )


# -- the stage, with a scripted backend (fault injection) -----------------------------------


@pytest.mark.anyio
async def test_stage_emits_growing_partials_and_keeps_text_streaming() -> None:
    pieces = ['{"na', 'me": "Al', 'ice", "age"', ": 3", '0, "color": "gr', 'een"}']
    backend = EventScript(steps=[text_events(*pieces)])
    events = await run_stream(backend, chat(schema=PERSON), [structured_output])
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert texts == pieces
    partials = [e for e in events if isinstance(e, JsonPartial)]
    assert [p.value for p in partials] == [
        {},
        {"name": "Al"},
        {"name": "Alice"},
        {"name": "Alice", "age": 30, "color": "gr"},
        {"name": "Alice", "age": 30, "color": "green"},
    ]
    assert partials[1].path == "$.name" and partials[3].path == "$.color"
    # Each json.partial follows the text delta that changed the value ('": 3"' did not:
    # a number appears once complete).
    kinds = [e.type for e in events if isinstance(e, TextDelta | JsonPartial)]
    assert kinds == [
        *["text.delta", "json.partial"] * 3,
        "text.delta",
        *["text.delta", "json.partial"] * 2,
    ]
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "stop"


@pytest.mark.anyio
async def test_early_violation_stops_the_backend_at_once() -> None:
    # The third piece breaks the enum; 50 more pieces would follow.
    pieces = ['{"name": "Al", ', '"age": 3, ', '"color": "pu', 'rple"}', *([" "] * 50)]
    backend = EventScript(steps=[text_events(*pieces)])
    events = await run_stream(backend, chat(schema=PERSON), [structured_output])
    failed = events[-1]
    assert isinstance(failed, StreamFailed)
    assert failed.error["type"] == "output_validation_error"
    assert failed.error["code"] == "json_schema_violation"
    assert failed.error["path"] == "$.color"
    # The violating delta never reached the journal; nothing after it was produced.
    assert [e.text for e in events if isinstance(e, TextDelta)] == pieces[:2]
    assert backend.yielded == [3]  # the violating piece was the last one pulled
    assert backend.closed == [True]


@pytest.mark.anyio
async def test_incomplete_json_at_stop_fails_but_length_passes() -> None:
    backend = EventScript(steps=[text_events('{"name": "Al"')])
    events = await run_stream(backend, chat(schema=PERSON), [structured_output])
    assert isinstance(events[-1], StreamFailed) and events[-1].error["code"] == "incomplete_json"
    backend = EventScript(steps=[text_events('{"name": "Al"', finish="length")])
    events = await run_stream(backend, chat(schema=PERSON), [structured_output])
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "length"


@pytest.mark.anyio
async def test_json_object_mode_requires_an_object() -> None:
    backend = EventScript(steps=[text_events("[1, 2]")])
    events = await run_stream(backend, chat(json_object=True), [structured_output])
    assert isinstance(events[-1], StreamFailed) and events[-1].error["path"] == "$"


# -- the embedded model (grammar-constrained), over HTTP ------------------------------------


def native_events(server: RunningServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", f"{server.url}/v1/streams", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def is_prefix_of(partial: Any, final: Any) -> bool:
    if isinstance(partial, dict):
        return isinstance(final, dict) and all(
            k in final and is_prefix_of(v, final[k]) for k, v in partial.items()
        )
    if isinstance(partial, list):
        return (
            isinstance(final, list)
            and all(is_prefix_of(p, f) for p, f in zip(partial, final, strict=False))
            and len(partial) <= len(final)
        )
    if isinstance(partial, str):
        return isinstance(final, str) and final.startswith(partial)
    return partial == final


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("schema", "seeds"), [(PERSON, [1, 2]), (INVENTORY, [4]), (VERDICT, [6])])
def test_embedded_json_schema_output_always_validates(
    server: RunningServer, schema: dict[str, Any], seeds: list[int]
) -> None:
    for seed in seeds:
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": "Answer with a JSON object."}],
            "seed": seed,
            "temperature": 0.7,
            "max_tokens": 160,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema},
            },
        }
        events = native_events(server, body)
        assert events[-1]["type"] == "stream.completed", events[-1]
        assert events[-1]["finish_reason"] == "stop"
        text = "".join(e["text"] for e in events if e["type"] == "text.delta")
        value = json.loads(text)
        jsonschema.validate(value, schema)
        partials = [e["value"] for e in events if e["type"] == "json.partial"]
        assert len(partials) >= 3
        assert partials[-1] == value
        # The partial value grows: each is a prefix of the next.
        for before, after in itertools.pairwise(partials):
            assert is_prefix_of(before, after), (before, after)
        # json.partial events come interleaved with the text, not at the end.
        kinds = [e["type"] for e in events if e["type"] in ("text.delta", "json.partial")]
        assert kinds.index("json.partial") < len(kinds) // 2


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=24)
    age: int
    color: Literal["red", "green", "blue"]


@pytest.mark.timeout(300)
def test_openai_client_stream_helper_parses_embedded_json(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    with client.chat.completions.stream(
        model="default",
        messages=[{"role": "user", "content": "Make up a person."}],
        response_format=Person,
        seed=11,
        temperature=0.7,
        max_tokens=120,
    ) as stream:
        deltas = [e for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 3
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert final.choices[0].finish_reason == "stop"


@pytest.mark.timeout(300)
def test_json_object_mode_and_bad_schema_over_http(server: RunningServer) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "A JSON object about cats."}],
        "seed": 3,
        "temperature": 0.5,
        "max_tokens": 24,
        "response_format": {"type": "json_object"},
    }
    events = native_events(server, body)
    last = events[-1]
    assert last["type"] == "stream.completed"
    text = "".join(e["text"] for e in events if e["type"] == "text.delta")
    assert text.lstrip().startswith("{")
    if last["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    bad = {
        **body,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": 5}},
        },
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=bad, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.timeout(60)
def test_violation_over_http_streaming_and_not() -> None:
    from .scripted import serve_app_in_thread

    pieces = ['{"name": "Al", ', '"color": 7', "}"]
    backend = EventScript(steps=[text_events(*pieces)])
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    with serve_app_in_thread(backend, disconnect_grace=0) as url:
        response = httpx.post(
            f"{url}/v1/chat/completions", json={**body, "response_format": schema}, timeout=30
        )
        assert response.status_code == 502
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "output_validation_error",
            "json_schema_violation",
            "$.color",
        )
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "hi"}],
            response_format=schema,  # type: ignore[arg-type]
            stream=True,
        )
        text = ""
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        assert "$.color" in str(caught.value)
        assert text == '{"name": "Al", '  # the output before the violation streamed
