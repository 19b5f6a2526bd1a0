"""A stream continued on the embedded model from the text a client already has (the engine
side of issue 18's takeover): ``LlamaCppBackend.continuation(request, partial)``, a request
whose last message is the partial answer (``continue_final_message``).

The continuation prefills prompt + answer so far and generates what follows: at temperature 0
the two parts make the uninterrupted answer; stop sequences, ``max_tokens`` and usage count
the whole answer; a JSON answer continues under its grammar, advanced through the partial
text; what cannot be continued fails clearly.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tokenwire.backends.llamacpp import LlamaCppBackend
from tokenwire.cancel import CancelToken
from tokenwire.errors import InvalidRequest
from tokenwire.events import Event, StreamCompleted, TextDelta, Usage
from tokenwire.requests import ChatRequest, Message, ResponseFormat, SamplingParams, Tool

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

COUNT = "Count from 1 to 40, separated by commas: 1, 2, 3,"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[LlamaCppBackend]:
    model = LlamaCppBackend(parallel=2, max_queue=4)
    await model.start()
    yield model
    await model.close()


def chat(content: str = COUNT, *, max_tokens: int = 40, **sampling: object) -> ChatRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)  # type: ignore[arg-type]
    return ChatRequest(
        model="default", messages=[Message(role="user", content=content)], sampling=params
    )


def continued(model: LlamaCppBackend, request: ChatRequest, partial: str) -> ChatRequest:
    following = model.continuation(request, partial)
    assert following is not None
    return following


async def run(model: LlamaCppBackend, request: ChatRequest) -> tuple[list[str], Usage, str]:
    """The text deltas, the usage and the finish reason of one stream."""
    deltas: list[str] = []
    usage: Usage | None = None
    finish = ""
    events: list[Event] = [e async for e in model.stream(request, CancelToken())]
    for event in events:
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        elif isinstance(event, Usage):
            usage = event
        elif isinstance(event, StreamCompleted):
            finish = event.finish_reason
    assert usage is not None
    return deltas, usage, finish


async def test_a_continuation_completes_the_uninterrupted_answer(
    backend: LlamaCppBackend,
) -> None:
    full, usage, finish = await run(backend, chat())
    assert len(full) > 12, full
    for cut in (1, len(full) // 2, len(full) - 2):
        produced = "".join(full[:cut])
        request = continued(backend, chat(), produced)
        rest, after, finish_again = await run(backend, request)
        assert produced + "".join(rest) == "".join(full), cut
        assert finish_again == finish
        # Usage counts the whole answer: what the client had and what was added.
        assert after.prompt_tokens == usage.prompt_tokens
        assert after.completion_tokens == usage.completion_tokens


async def test_max_tokens_counts_the_answer_so_far(backend: LlamaCppBackend) -> None:
    full, _, _ = await run(backend, chat(max_tokens=10))
    produced = "".join(full)  # all ten tokens: nothing is left to generate
    rest, usage, finish = await run(backend, continued(backend, chat(max_tokens=10), produced))
    assert rest == [] and finish == "length" and usage.completion_tokens >= 10


async def test_a_stop_sequence_still_ends_a_continued_answer(backend: LlamaCppBackend) -> None:
    stopped = chat(stop=["9,"])
    full, _, finish = await run(backend, stopped)
    text = "".join(full)
    assert finish == "stop" and text.rstrip().endswith("8,"), text
    for cut in (3, len(full) - 1):
        produced = "".join(full[:cut])
        rest, _, finish_again = await run(backend, continued(backend, stopped, produced))
        assert produced + "".join(rest) == text
        assert finish_again == "stop"


async def test_json_continues_under_its_grammar(backend: LlamaCppBackend) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    request = chat("Give a person's name and age as JSON.", max_tokens=60)
    request.response_format = ResponseFormat(type="json_schema", schema=schema)
    full, _, finish = await run(backend, request)
    assert finish == "stop"
    document = json.loads("".join(full))
    assert set(document) == {"name", "age"}
    produced = "".join(full[: len(full) // 2])
    rest, _, _ = await run(backend, continued(backend, request, produced))
    assert json.loads(produced + "".join(rest)) == document

    # Text its grammar cannot have produced: refused before decoding, the process lives.
    with pytest.raises(InvalidRequest, match="output format"):
        await run(backend, continued(backend, request, "Sure! Here"))
    again, _, _ = await run(backend, request)
    assert again == full


async def test_a_stream_offering_tools_is_not_continued(backend: LlamaCppBackend) -> None:
    request = chat()
    request.tools = [Tool(name="lookup", parameters={"type": "object", "properties": {}})]
    assert backend.continuation(request, '{"name": "look') is None
