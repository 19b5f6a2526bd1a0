"""Helpers for the structured-output, tool and guard tests.

``EventScript`` is a fault-injection backend double: it yields a fixed list of events per
call (one list per model step) and records how far it got, whether it was closed, and every
request it saw. ``run_stream`` drives a real ``StreamManager`` with a ``MemoryJournal``
in-process and returns the journaled events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.events import Event, Progress, StreamCompleted, TextDelta, Usage
from tokenwire.journal.memory import MemoryJournal
from tokenwire.requests import ChatRequest, Message, ResponseFormat, SamplingParams, Tool
from tokenwire.router import Router
from tokenwire.streams import Stage, StreamManager


def text_events(*pieces: str, finish: str = "stop") -> list[Event]:
    return [
        *(TextDelta(text=p) for p in pieces),
        Usage(prompt_tokens=5, completion_tokens=len(pieces)),
        StreamCompleted(finish_reason=finish),
    ]


@dataclass
class EventScript(Backend):
    steps: list[list[Event]] = field(default_factory=list)
    gap: float = 0.0
    name: str = "script"
    requests: list[ChatRequest] = field(default_factory=list)
    #: Events yielded per step, and whether the consumer closed the step early.
    yielded: list[int] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("script")]

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        step = len(self.requests)
        self.requests.append(request)
        self.yielded.append(0)
        self.closed.append(False)
        script = self.steps[min(step, len(self.steps) - 1)]
        yield Progress(stage="prefill")
        try:
            for event in script:
                if cancel.is_cancelled():
                    return
                if self.gap:
                    await asyncio.sleep(self.gap)
                self.yielded[step] += 1
                yield event
        except GeneratorExit:
            self.closed[step] = True
            raise


def chat(
    content: str = "Hi",
    *,
    tools: Sequence[Tool] = (),
    tool_choice: Any = None,
    schema: dict[str, Any] | None = None,
    json_object: bool = False,
    **sampling: Any,
) -> ChatRequest:
    fmt = ResponseFormat()
    if schema is not None:
        fmt = ResponseFormat(type="json_schema", schema=schema, name="out")
    elif json_object:
        fmt = ResponseFormat(type="json_object")
    return ChatRequest(
        model="default",
        messages=[Message(role="user", content=content)],
        sampling=SamplingParams(**sampling),
        tools=list(tools),
        tool_choice=tool_choice,
        response_format=fmt,
    )


async def run_stream(
    backend: Backend, request: ChatRequest, stages: list[Stage], *, start: bool = False
) -> list[Event]:
    manager = StreamManager(Router(backend), MemoryJournal(), stages=stages, disconnect_grace=0)
    if start:
        await backend.start()
    await manager.start_background()
    try:
        meta = await manager.start(request, protocol="native")
        return [event async for event in manager.read(meta.id)]
    finally:
        await manager.close()
