"""A continued answer (takeover, ``ChatRequest.continue_final_message``): the stages that track
the answer's text start from the partial answer that already streamed, so structured output
validates the whole document and guards see matches that span the seam."""

from __future__ import annotations

import dataclasses

import pytest

from tokenwire.events import GuardTriggered, JsonPartial, StreamCompleted, TextDelta
from tokenwire.requests import ChatRequest, Message
from tokenwire.stages.guards import Guards, parse_guard
from tokenwire.stages.structured import structured_output

from .stage_support import EventScript, chat, run_stream, text_events


def continued(request: ChatRequest, partial: str) -> ChatRequest:
    messages = [*request.messages, Message(role="assistant", content=partial)]
    return dataclasses.replace(request, messages=messages, continue_final_message=True)


def test_the_prefill_is_the_final_assistant_message_only_when_continuing() -> None:
    request = chat(json_object=True)
    assert request.prefill == ""
    assert continued(request, '{"a": ').prefill == '{"a": '
    unflagged = dataclasses.replace(continued(request, "x"), continue_final_message=False)
    assert unflagged.prefill == ""


@pytest.mark.anyio
async def test_structured_output_validates_the_continued_document_whole() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
        "required": ["a"],
    }
    request = continued(chat(schema=schema), '{"a": [1, ')
    backend = EventScript(steps=[text_events("2", ", 3]", "}")])
    events = await run_stream(backend, request, [structured_output])
    values = [e.value for e in events if isinstance(e, JsonPartial)]
    # Without the prefill, "2, 3]}" alone is not JSON and the stream would fail.
    assert values[-1] == {"a": [1, 2, 3]}
    assert isinstance(events[-1], StreamCompleted) and events[-1].finish_reason == "stop"


@pytest.mark.anyio
async def test_a_guard_sees_a_match_that_spans_the_seam() -> None:
    guards = Guards([parse_guard(r"ssn=\d{3}-\d{2}-\d{4}")])
    request = continued(chat(), "my SSN is 123-4")
    backend = EventScript(steps=[text_events("5-6789", " and more")])
    events = await run_stream(backend, request, [guards])
    fired = [e for e in events if isinstance(e, GuardTriggered)]
    assert len(fired) == 1 and fired[0].match == "123-45-6789"
    assert fired[0].position == len("my SSN is ")  # offsets count the whole answer
    assert not [e for e in events if isinstance(e, TextDelta)]  # the match began before
    assert isinstance(events[-1], StreamCompleted)
    assert events[-1].finish_reason == "content_filter"
