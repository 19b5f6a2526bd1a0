"""Server-side tools: Python functions the server runs for the model, in a loop.

Register a typed function with ``@tool`` (the JSON schema of its parameters comes from its
signature through pydantic; its description from the docstring), or load functions with
``tokenwire serve --tools module:attr`` (``attr``: a ``ToolRegistry``, a function, or a list
of functions).

``ToolLoop`` is the stage that runs them. It offers the registered tools to the model beside
the request's own, and for each step: streams the model's output, lets ``stages/tools.py``
buffer and validate each call, runs the server-side calls off the event loop (``progress``
events with ``stage="tool"``: started, elapsed every second, finished or failed), appends the
call and its result to the conversation as a ``tool`` message, and asks the model again, until
it answers without calling a server-side tool. Then the final answer streams as usual.

- Server-side calls are the server's business: their ``tool_call.*`` events are not passed on
  (OpenAI clients would see calls to functions they never declared); progress says it all,
  and a ``tool.result`` event per call (the call and its output) serves wires that show
  server-run tools (the UI message stream's tool parts); the others skip it.
  Calls to the client's own tools end the stream with ``finish_reason`` ``tool_calls`` as usual
  (server-side calls of that same turn are then not run: the client continues the turn).
- A tool that raises, times out (``timeout`` per tool, default the loop's) or gets invalid
  arguments does not fail the stream: the error goes back to the model as the tool's result.
  A timed-out function's thread cannot be killed; it is abandoned.
- After ``max_steps`` tool rounds the model is asked once more with ``tool_choice`` ``none``;
  a model that still calls a tool then fails the stream (``max_tool_steps``).
- Usage is summed over the steps and reported once, before the terminal event.
- Requests asking for a JSON ``response_format`` (and no tools of their own) are left alone:
  the embedded model's grammar can constrain to a schema or to tool calls, not both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import importlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pydantic

from tokenwire.cancel import CancelToken
from tokenwire.errors import InvalidRequest, OutputValidationError
from tokenwire.events import (
    Event,
    Progress,
    StreamCompleted,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    Usage,
    aclose,
)
from tokenwire.requests import ChatRequest, Message, Tool, ToolCall
from tokenwire.stages.tools import ToolCallError

__all__ = ["ToolLoop", "ToolRegistry", "ToolSpec", "load_tools", "registry", "tool"]

OpenStream = Callable[[ChatRequest, CancelToken], AsyncIterator[Event]]


@dataclass(slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    timeout: float | None = None
    is_async: bool = False

    def definition(self) -> Tool:
        return Tool(name=self.name, description=self.description, parameters=self.parameters)


class ToolRegistry:
    """Named server-side tools. ``registry.tool`` is the decorator."""

    def __init__(self, tools: Iterable[ToolSpec] = ()) -> None:
        self._tools: dict[str, ToolSpec] = {}
        for spec in tools:
            self._tools[spec.name] = spec

    def tool(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """``@tool`` or ``@tool(name=…, timeout=…)``: register a typed function."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(fn, name=name, description=description, timeout=timeout)
            return fn

        return register(function) if function is not None else register

    def add(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> ToolSpec:
        name = name or function.__name__
        if not name.replace("_", "").replace("-", "").isalnum() or len(name) > 64:
            raise ValueError(f"tool names are [a-zA-Z0-9_-]{{1,64}}, not {name!r}")
        try:
            schema = pydantic.TypeAdapter(function).json_schema()  # type: ignore[arg-type]
        except pydantic.PydanticUserError as exc:
            raise ValueError(f"tool {name!r}: cannot derive a JSON schema: {exc}") from exc
        doc = inspect.getdoc(function) or ""
        spec = ToolSpec(
            name=name,
            description=description or doc.split("\n\n")[0].replace("\n", " "),
            parameters=schema,
            function=pydantic.validate_call(function),
            timeout=timeout,
            is_async=inspect.iscoroutinefunction(function),
        )
        self._tools[name] = spec
        return spec

    def merge(self, other: ToolRegistry) -> None:
        self._tools.update(other._tools)

    def get(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)


#: The default registry that ``@tool`` adds to.
registry = ToolRegistry()
tool = registry.tool


def load_tools(references: Iterable[str]) -> ToolRegistry:
    """Tools from ``module:attr`` references (a registry, a function or a list of them)."""
    loaded = ToolRegistry()
    for reference in references:
        module_name, _, attr = reference.partition(":")
        if not module_name or not attr:
            raise InvalidRequest(f"--tools takes module:attr, not {reference!r}", param="tools")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise InvalidRequest(f"--tools {reference}: {exc}", param="tools") from exc
        if isinstance(target, ToolRegistry):
            loaded.merge(target)
        elif isinstance(target, ToolSpec):
            loaded._tools[target.name] = target
        elif callable(target):
            loaded.add(target)
        elif isinstance(target, list | tuple):
            for item in target:
                if isinstance(item, ToolSpec):
                    loaded._tools[item.name] = item
                else:
                    loaded.add(item)
        else:
            raise InvalidRequest(f"--tools {reference}: not a tool, list or registry")
    return loaded


@dataclass(slots=True)
class _Step:
    """What one model turn of the tool loop left: our tools' calls, and how it ended."""

    calls: list[ToolCallCompleted | ToolCallError] = dataclasses.field(default_factory=list)
    server_indexes: set[int] = dataclasses.field(default_factory=set)
    client_calls: bool = False
    terminal: StreamCompleted | None = None
    messages: list[Message] = dataclasses.field(default_factory=list)
    stopped: bool = False


@dataclass(slots=True)
class _Result:
    content: str
    ok: bool


class ToolLoop:
    """The server-side tool loop stage (see the module docstring).

    ``open_stream(request, cancel)`` starts one model step: the backend with the stages that
    sit inside this one (tool-call buffering), so every step is validated the same way.
    """

    def __init__(
        self,
        tools: ToolRegistry,
        open_stream: OpenStream,
        *,
        timeout: float = 30.0,
        max_steps: int = 4,
        progress_interval: float = 1.0,
    ) -> None:
        self.tools = tools
        self.open_stream = open_stream
        self.timeout = timeout
        self.max_steps = max_steps
        self.progress_interval = progress_interval
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="tokenwire-tool"
        )

    def __call__(
        self, events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        if not len(self.tools) or request.tool_choice == "none":
            return events
        if request.response_format.type != "text" and not request.tools:
            # A JSON answer was asked for: its grammar and validation come first.
            return events
        return self._run(events, request, cancel)

    def _with_tools(self, request: ChatRequest, tool_choice: Any) -> ChatRequest:
        own = {t.name for t in request.tools}
        offered = [*request.tools, *(s.definition() for s in self.tools if s.name not in own)]
        return dataclasses.replace(
            request, tools=offered, messages=list(request.messages), tool_choice=tool_choice
        )

    async def _run(
        self, events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        # The manager's stream was never started: each step opens its own, with our tools.
        await aclose(events)
        step_request = self._with_tools(request, request.tool_choice)
        usage = Usage(prompt_tokens=0, completion_tokens=0, ttft_ms=None)
        steps = 0
        while True:
            step = _Step()
            async for event in self._step(step_request, cancel, step, usage):
                yield event
            if not step.calls or step.client_calls:
                # Done, or the client has calls of its own to run: hand the turn back.
                yield usage
                if step.terminal is not None:
                    yield step.terminal
                return
            if steps >= self.max_steps:
                raise OutputValidationError(
                    f"The model kept calling tools after {self.max_steps} tool steps.",
                    code="max_tool_steps",
                )
            steps += 1
            async for event in self._call(step, cancel):
                yield event
            if step.stopped:
                return
            step_request.messages.extend(step.messages)
            last = steps >= self.max_steps
            step_request = dataclasses.replace(
                step_request,
                messages=list(step_request.messages),
                tool_choice="none" if last else "auto",
            )

    async def _step(
        self, request: ChatRequest, cancel: CancelToken, step: _Step, usage: Usage
    ) -> AsyncIterator[Event]:
        """One model turn: what the client sees passes through; our tools' calls, its usage
        (added to ``usage``) and its terminal event are kept in ``step``."""
        stream = self.open_stream(request, cancel)
        try:
            async for event in stream:
                if isinstance(event, Usage):
                    usage.prompt_tokens += event.prompt_tokens
                    usage.completion_tokens += event.completion_tokens
                    usage.ttft_ms = event.ttft_ms if usage.ttft_ms is None else usage.ttft_ms
                elif isinstance(event, ToolCallStarted) and event.name in self.tools:
                    step.server_indexes.add(event.index)
                elif isinstance(event, ToolCallDelta) and event.index in step.server_indexes:
                    pass
                elif isinstance(event, ToolCallCompleted) and event.name in self.tools:
                    step.calls.append(event)
                elif isinstance(event, ToolCallCompleted):
                    step.client_calls = True
                    yield event
                elif isinstance(event, StreamCompleted):
                    step.terminal = event
                else:
                    yield event
        except ToolCallError as exc:
            if exc.name not in self.tools:
                raise
            step.calls.append(exc)  # invalid arguments go back to the model
        finally:
            await aclose(stream)

    async def _call(self, step: _Step, cancel: CancelToken) -> AsyncIterator[Event]:
        """Run the step's calls in order, with progress and results; the assistant turn and
        the results for the next step land in ``step.messages`` (``step.stopped`` on Stop)."""
        assistant = Message(role="assistant", content="", tool_calls=[])
        results: list[Message] = []
        for call in step.calls:
            if isinstance(call, ToolCallError):
                call_id, name, arguments = call.call_id, call.name, call.arguments
                result = _Result(f"error: invalid arguments: {call.message}", ok=False)
                yield Progress(stage="tool", message=f"{name}: invalid arguments")
            else:
                call_id, name, arguments = call.id, call.name, call.arguments
                result = _Result("", ok=False)
                async for progress in self._execute(name, arguments, cancel, result):
                    yield progress
                if cancel.is_cancelled():
                    step.stopped = True
                    return
            assistant.tool_calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
            yield ToolResult(
                id=call_id,
                name=name,
                arguments=arguments,
                output=result.content,
                error=not result.ok,
            )
            results.append(
                Message(role="tool", content=result.content, tool_call_id=call_id, name=name)
            )
        step.messages = [assistant, *results]

    async def _execute(
        self, name: str, arguments: str, cancel: CancelToken, result: _Result
    ) -> AsyncIterator[Progress]:
        """Run one call off the loop, with progress; the outcome lands in ``result``."""
        spec = self.tools.get(name)
        assert spec is not None
        timeout = spec.timeout if spec.timeout is not None else self.timeout
        started = time.perf_counter()
        yield Progress(stage="tool", message=f"{name} started", fraction=0.0)
        try:
            kwargs = json.loads(arguments or "{}")
        except ValueError as exc:  # validated upstream; kept for non-buffered callers
            result.content = f"error: arguments are not JSON: {exc}"
            yield Progress(stage="tool", message=f"{name} failed: invalid arguments")
            return
        task = asyncio.ensure_future(self._invoke(spec, kwargs))
        stopped = asyncio.ensure_future(cancel.wait())
        try:
            while True:
                elapsed = time.perf_counter() - started
                remaining = timeout - elapsed
                if remaining <= 0:
                    task.cancel()
                    result.content = f"error: {name} timed out after {timeout:g}s"
                    yield Progress(stage="tool", message=f"{name} timed out after {timeout:g}s")
                    return
                wait = min(self.progress_interval, remaining)
                done, _ = await asyncio.wait(
                    {task, stopped}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if stopped in done:
                    task.cancel()
                    return
                if task in done:
                    break
                yield Progress(
                    stage="tool",
                    message=f"{name} running: {time.perf_counter() - started:.1f}s elapsed",
                    fraction=min(0.99, (time.perf_counter() - started) / timeout),
                )
        finally:
            stopped.cancel()
        seconds = time.perf_counter() - started
        error = task.exception()
        if error is not None:
            result.content = f"error: {type(error).__name__}: {error}"
            yield Progress(stage="tool", message=f"{name} failed after {seconds:.2f}s: {error}")
            return
        result.content, result.ok = _as_text(task.result()), True
        yield Progress(stage="tool", message=f"{name} finished in {seconds:.2f}s", fraction=1.0)

    async def _invoke(self, spec: ToolSpec, kwargs: dict[str, Any]) -> Any:
        if spec.is_async:
            return await spec.function(**kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(spec.function, **kwargs)
        )


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    return json.dumps(value, default=str)
