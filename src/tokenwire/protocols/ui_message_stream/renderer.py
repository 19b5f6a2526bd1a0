"""The UI chat's renderer: a stream's events as UI message chunks, in the client's chunk set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from tokenwire.events import (
    Event,
    GuardTriggered,
    Progress,
    StreamCancelled,
    StreamCompleted,
    StreamFailed,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    Usage,
)
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import (
    Payload,
)
from tokenwire.protocols.base import Renderer as BaseRenderer

__all__ = ["DEFAULT_VERSION", "DONE", "VERSIONS", "Renderer", "message_id"]

#: The terminal sentinel of a UI message stream over SSE.
DONE = "[DONE]"
#: Client majors whose chunk sets differ (see the module docstring).
VERSIONS = (5, 6, 7)
DEFAULT_VERSION = 6

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
}


def message_id(meta: StreamMeta) -> str:
    """The assistant message's id: the one the request continues, else the stream's."""
    continued = meta.render.get("message_id")
    return continued if isinstance(continued, str) else f"msg-{meta.id}"


class Renderer(BaseRenderer):
    """A stream's events as UI message chunks, for one reader.

    Stateful: text blocks open and close around other parts (``text-start`` … ``text-end``
    with one id), and a tool call's input streams between ``tool-input-start`` and
    ``tool-input-available``. Every reader renders from the stream's start (a resume is a
    replay for the SDK), so the state is rebuilt the same way on any replica.
    """

    needs_history: ClassVar[bool] = True
    #: A structured answer's text streams as text parts already; its parsed prefixes have
    #: no chunk of their own.
    drops: ClassVar[frozenset[str]] = frozenset({"json.partial"})

    def __init__(self, meta: StreamMeta) -> None:
        super().__init__(meta)
        version = meta.render.get("version", DEFAULT_VERSION)
        self.version = version if version in VERSIONS else DEFAULT_VERSION
        self._text_id: str | None = None
        self._blocks = 0
        self._open_tools: dict[int, tuple[str, str]] = {}
        self._usage: Usage | None = None
        #: Server-side tools ran in this step: the next output opens a new step.
        self._tools_ran = False
        self._started = False
        # A text delta is the same JSON but for its id and delta: encode once, splice.
        self._delta_head = b""

    def _close_text(self, out: list[Payload]) -> None:
        if self._text_id is not None:
            out.append({"type": "text-end", "id": self._text_id})
            self._text_id = None

    def _next_step(self, out: list[Payload]) -> None:
        if self._tools_ran:
            self._tools_ran = False
            out.append({"type": "finish-step"})
            out.append({"type": "start-step"})

    def _open_text(self, event: TextDelta) -> list[Payload]:
        """A text block opens (a new step first, after server-side tools): its start and
        first delta; later deltas splice their text into the encoded head."""
        out: list[Payload] = []
        self._next_step(out)
        self._blocks += 1
        self._text_id = f"text-{self._blocks}"
        head = orjson.dumps({"type": "text-delta", "id": self._text_id, "delta": ""})
        self._delta_head = head[: -len(b'""}')]  # up to and including "delta":
        out.append({"type": "text-start", "id": self._text_id})
        out.append(self._delta_head + orjson.dumps(event.text) + b"}")
        return out

    def _start(self, out: list[Payload]) -> None:
        if not self._started:  # again: another replica took the stream over
            self._started = True
            out.append({"type": "start", "messageId": message_id(self.meta)})
            out.append({"type": "start-step"})

    def _tool_delta(self, event: ToolCallDelta, out: list[Payload]) -> None:
        opened = self._open_tools.get(event.index)
        if opened is not None and event.arguments_delta:
            out.append(
                {
                    "type": "tool-input-delta",
                    "toolCallId": opened[0],
                    "inputTextDelta": event.arguments_delta,
                }
            )

    def _finish(self, event: StreamCompleted) -> dict[str, Any]:
        finish: dict[str, Any] = {"type": "finish"}
        if self.version >= 6:
            finish["finishReason"] = _FINISH_REASONS.get(event.finish_reason, "other")
        if self._usage is not None:
            finish["messageMetadata"] = {"usage": _usage(self._usage)}
        return finish

    def render(self, event: Event) -> Sequence[Payload]:
        if type(event) is TextDelta:
            if self._text_id is None:
                return self._open_text(event)
            return [self._delta_head + orjson.dumps(event.text) + b"}"]
        out: list[Payload] = []
        if isinstance(event, StreamStarted):
            self._start(out)
        elif isinstance(event, Progress):
            out.append(_progress(event))
        elif isinstance(event, ToolCallStarted):
            self._close_text(out)
            self._next_step(out)
            self._open_tools[event.index] = (event.id, event.name)
            out.append({"type": "tool-input-start", "toolCallId": event.id, "toolName": event.name})
        elif isinstance(event, ToolCallDelta):
            self._tool_delta(event, out)
        elif isinstance(event, ToolCallCompleted):
            self._close_text(out)
            self._open_tools.pop(event.index, None)
            arguments = _loads(event.arguments or "{}")
            out.append(
                {
                    "type": "tool-input-available",
                    "toolCallId": event.id,
                    "toolName": event.name,
                    "input": arguments,
                }
            )
        elif isinstance(event, ToolResult):
            self._close_text(out)
            out.extend(_tool_result(event))
            self._tools_ran = True
        elif isinstance(event, GuardTriggered):
            self._close_text(out)
            out.append(
                {
                    "type": "data-guard",
                    "data": {
                        "guard": event.guard,
                        "match": event.match,
                        "position": event.position,
                    },
                }
            )
        elif isinstance(event, Usage):
            self._usage = event
        elif isinstance(event, StreamCompleted):
            self._close_text(out)
            out.append({"type": "finish-step"})
            out.append(self._finish(event))
            out.append(DONE)
        elif isinstance(event, StreamCancelled):
            self._close_text(out)
            out.append(
                {"type": "abort", "reason": event.reason}
                if self.version >= 6
                else {"type": "abort"}
            )
            out.append(DONE)
        elif isinstance(event, StreamFailed):
            self._close_text(out)
            out.append({"type": "error", "errorText": str(event.error.get("message") or "error")})
            out.append(DONE)
        return out


def _progress(event: Progress) -> dict[str, Any]:
    """A transient data part (the UI shows it, the message does not keep it)."""
    data: dict[str, Any] = {"stage": event.stage, "message": event.message}
    if event.position is not None:
        data["position"] = event.position
    if event.fraction is not None:
        data["fraction"] = event.fraction
    return {"type": "data-progress", "id": "progress", "data": data, "transient": True}


def _tool_result(event: ToolResult) -> list[Payload]:
    """A server-side tool's call and result, as the client-side tool parts the UI knows."""
    base = {"toolCallId": event.id, "toolName": event.name}
    output: dict[str, Any] = (
        {"type": "tool-output-error", "toolCallId": event.id, "errorText": event.output}
        if event.error
        else {
            "type": "tool-output-available",
            "toolCallId": event.id,
            "output": _loads(event.output),
        }
    )
    return [
        {"type": "tool-input-start", **base},
        {"type": "tool-input-available", **base, "input": _loads(event.arguments)},
        output,
    ]


def _loads(text: str) -> Any:
    """JSON text as its value (tool inputs and outputs are objects for the UI); else the
    text itself."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _usage(usage: Usage) -> dict[str, Any]:
    data: dict[str, Any] = {
        "inputTokens": usage.prompt_tokens,
        "outputTokens": usage.completion_tokens,
        "totalTokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.cached_tokens is not None:
        data["cachedInputTokens"] = usage.cached_tokens
    return data
