"""The UI chat's request: the body ``useChat`` sends, its UIMessages as the neutral
conversation, and the conversation a chat keeps from one answer to the next."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwire.errors import InvalidRequest
from tokenwire.events import (
    Event,
    TextDelta,
    ToolResult,
)
from tokenwire.requests import Message, ToolCall

__all__ = [
    "ChatBody",
    "StopBody",
    "UIMessage",
    "answer_messages",
    "parse_body",
    "to_messages",
]

# -- wire models ---------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class UIMessage(_Wire):
    id: str = ""
    role: Literal["system", "user", "assistant"]
    parts: list[dict[str, Any]] = Field(default_factory=list)
    metadata: Any = None


class ChatBody(_Wire):
    """What ``DefaultChatTransport`` POSTs (plus the tokenwire options it may carry in
    ``body``). Either ``messages`` (the whole chat, as ``useChat`` sends it) or ``message``
    (the last one only)."""

    id: str = Field(min_length=1, max_length=256)
    messages: list[UIMessage] | None = None
    message: UIMessage | None = None
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = None
    model: str = "default"
    system: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    topP: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    maxOutputTokens: int | None = Field(default=None, ge=1)
    stopSequences: list[str] | None = None
    #: streamText's ``toolChoice``: auto, none, required, or {type: "tool", toolName}.
    toolChoice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    uiMessageStreamVersion: int | None = None


class StopBody(_Wire):
    messageId: str | None = None
    activeStreamId: str | None = None


# -- parse ---------------------------------------------------------------------------------


def _text(parts: list[dict[str, Any]]) -> str:
    return "".join(
        part["text"]
        for part in parts
        if part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _tool_name(part: dict[str, Any]) -> str | None:
    kind = part.get("type")
    if not isinstance(kind, str):
        return None
    if kind == "dynamic-tool":
        name = part.get("toolName")
        return name if isinstance(name, str) else None
    return kind[len("tool-") :] if kind.startswith("tool-") else None


def _assistant_messages(parts: list[dict[str, Any]]) -> list[Message]:
    """One assistant UIMessage as the conversation the model had: per step, its text and
    tool calls, then a ``tool`` message per call with its output (or error)."""
    out: list[Message] = []
    steps: list[list[dict[str, Any]]] = [[]]
    for part in parts:
        if part.get("type") == "step-start" and steps[-1]:
            steps.append([])
        else:
            steps[-1].append(part)
    for step in steps:
        calls: list[ToolCall] = []
        results: list[Message] = []
        for part in step:
            name = _tool_name(part)
            call_id = part.get("toolCallId")
            if name is None or not isinstance(call_id, str):
                continue
            state = part.get("state")
            if state not in ("output-available", "output-error"):
                continue  # a call the client never answered: not part of the history
            calls.append(ToolCall(id=call_id, name=name, arguments=_json(part.get("input"))))
            result = (
                _json(part.get("output"))
                if state == "output-available"
                else f"error: {part.get('errorText', '')}"
            )
            results.append(Message(role="tool", content=result, tool_call_id=call_id))
        text = _text(step)
        if text or calls:
            out.append(Message(role="assistant", content=text, tool_calls=calls))
        out.extend(results)
    return out


def _json(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode() if value is not None else "{}"


def to_messages(ui_messages: Sequence[UIMessage]) -> list[Message]:
    """UIMessages (``parts``) as the neutral conversation."""
    messages: list[Message] = []
    for message in ui_messages:
        if message.role == "assistant":
            messages.extend(_assistant_messages(message.parts))
        else:
            messages.append(Message(role=message.role, content=_text(message.parts)))
    return messages


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return InvalidRequest(f"Invalid request: {param}: {first['msg']}", param=param)


def parse_body(body: Any) -> ChatBody:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return ChatBody.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def answer_messages(events: list[Event]) -> list[Message]:
    """A finished answer's events as the conversation the model had: per step its text and
    the server-side tools it ran (``tool.result``), then their results."""
    out: list[Message] = []
    text: list[str] = []
    calls: list[ToolCall] = []
    results: list[Message] = []

    def flush() -> None:
        if text or calls:
            out.append(Message(role="assistant", content="".join(text), tool_calls=list(calls)))
        out.extend(results)
        text.clear()
        calls.clear()
        results.clear()

    for event in events:
        if isinstance(event, TextDelta):
            if calls:
                flush()
            text.append(event.text)
        elif isinstance(event, ToolResult):
            calls.append(ToolCall(id=event.id, name=event.name, arguments=event.arguments))
            results.append(Message(role="tool", content=event.output, tool_call_id=event.id))
    flush()
    return out
