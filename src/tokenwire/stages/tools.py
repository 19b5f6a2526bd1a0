"""Tool calls, buffered until complete and validated before ``tool_call.completed``.

``tool_call.started`` / ``tool_call.delta`` pass through at once (UIs show arguments as they
stream), while each call's arguments are fed to a ``SchemaStream`` for that tool's parameter
schema: invalid JSON or a schema violation fails the stream at the first offending character
(the backend is closed, decoding stops) with ``OutputValidationError`` naming the JSON path
inside the arguments. When the backend finishes, every call is validated as a whole and
``tool_call.completed`` is emitted with the full arguments, then the terminal event with
``finish_reason`` ``tool_calls``. A call to a function that is not in ``tools`` fails too.

Backends that only emit ``tool_call.completed`` (non-streaming upstreams) are validated the
same way. A stream cut off by ``max_tokens`` (``length``) keeps its deltas but no
``completed`` event: its arguments are not complete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import jsonschema

from tokenwire.cancel import CancelToken
from tokenwire.errors import OutputValidationError
from tokenwire.events import (
    Event,
    StreamCompleted,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    aclose,
)
from tokenwire.requests import ChatRequest
from tokenwire.stages.structured import SchemaStream, compile_schema

__all__ = ["ToolCallError", "buffer_tool_calls"]


class ToolCallError(OutputValidationError):
    """Invalid arguments (or an unknown function) in a tool call; says which call."""

    def __init__(
        self,
        message: str,
        *,
        index: int,
        call_id: str,
        name: str,
        arguments: str,
        path: str = "$",
        code: str = "invalid_tool_arguments",
    ) -> None:
        super().__init__(message, path=path, code=code)
        self.index = index
        self.call_id = call_id
        self.name = name
        self.arguments = arguments


@dataclass(slots=True)
class _Call:
    index: int
    id: str
    name: str
    stream: SchemaStream
    arguments: list[str] = field(default_factory=list)

    def fail(self, exc: OutputValidationError) -> ToolCallError:
        error = ToolCallError(
            f"Tool call {self.name!r}: {exc.message}",
            index=self.index,
            call_id=self.id,
            name=self.name,
            arguments="".join(self.arguments),
            path=exc.path,
            code="invalid_tool_arguments" if exc.code != "unknown_tool" else exc.code,
        )
        error.__cause__ = exc
        return error


def buffer_tool_calls(
    events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
) -> AsyncIterator[Event]:
    """The stage (see the module docstring); a no-op for requests without tools."""
    if not request.tools:
        return events
    return _buffer(events, request)


class _Calls:
    """One stream's tool calls: each fed to its tool's schema as it streams, then closed."""

    def __init__(self, request: ChatRequest) -> None:
        self.validators: dict[str, jsonschema.protocols.Validator] = {
            tool.name: compile_schema(
                tool.parameters or {"type": "object"}, param=f"tools.{i}.function.parameters"
            )
            for i, tool in enumerate(request.tools)
        }
        self.calls: dict[int, _Call] = {}
        self.completed: set[int] = set()

    def open(self, index: int, call_id: str, name: str) -> _Call:
        validator = self.validators.get(name)
        if validator is None:
            raise ToolCallError(
                f"The model called {name!r}, which is not one of the request's tools.",
                index=index,
                call_id=call_id,
                name=name,
                arguments="",
                code="unknown_tool",
            )
        call = _Call(index, call_id, name, SchemaStream(validator, label="arguments"))
        self.calls[index] = call
        return call

    @staticmethod
    def feed(call: _Call, text: str) -> None:
        call.arguments.append(text)
        try:
            call.stream.feed(text)
        except OutputValidationError as exc:
            raise call.fail(exc) from exc

    def delta(self, event: ToolCallDelta) -> None:
        call = self.calls.get(event.index)
        if call is None:
            raise OutputValidationError(
                f"tool_call.delta for call {event.index} before tool_call.started",
                code="invalid_tool_call",
            )
        self.feed(call, event.arguments_delta)

    def whole(self, event: ToolCallCompleted) -> list[Event]:
        """A ``tool_call.completed``: the arguments, if none streamed; validated, once."""
        call = self.calls.get(event.index) or self.open(event.index, event.id, event.name)
        if not call.arguments:
            self.feed(call, event.arguments)
        return [] if event.index in self.completed else [self.complete(call)]

    def complete(self, call: _Call) -> ToolCallCompleted:
        arguments = "".join(call.arguments)
        try:
            if not arguments.strip():
                call.stream.feed("{}")  # OpenAI sends "" for a call without arguments
                arguments = "{}"
            call.stream.close()
        except OutputValidationError as exc:
            raise call.fail(exc) from exc
        self.completed.add(call.index)
        return ToolCallCompleted(index=call.index, id=call.id, name=call.name, arguments=arguments)

    def finish(self, event: StreamCompleted) -> Iterator[Event]:
        """The end: every call not completed yet is, then the terminal event (``tool_calls``
        unless the stream was cut by ``length``, whose calls are not whole)."""
        if event.finish_reason == "length" or not self.calls:
            yield event
            return
        for index in sorted(self.calls):
            if index not in self.completed:
                yield self.complete(self.calls[index])
        reason = event.finish_reason
        yield StreamCompleted(finish_reason="tool_calls" if reason == "stop" else reason)


async def _buffer(events: AsyncIterator[Event], request: ChatRequest) -> AsyncIterator[Event]:
    try:
        calls = _Calls(request)
        async for event in events:
            if isinstance(event, ToolCallStarted):
                calls.open(event.index, event.id, event.name)
                yield event
            elif isinstance(event, ToolCallDelta):
                calls.delta(event)
                yield event
            elif isinstance(event, ToolCallCompleted):
                for done in calls.whole(event):
                    yield done
            elif isinstance(event, StreamCompleted):
                for done in calls.finish(event):
                    yield done
            else:
                yield event
    finally:
        await aclose(events)
