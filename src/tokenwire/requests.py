"""The neutral request every protocol parses into and every backend reads.

These are not wire models: ``protocols/`` owns the OpenAI and Anthropic shapes and their
validation; a ``ChatRequest`` is what is left once a request has been understood.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ChatRequest",
    "Message",
    "ResponseFormat",
    "SamplingParams",
    "Tool",
    "ToolCall",
]

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(slots=True, kw_only=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(slots=True, kw_only=True)
class Message:
    role: Role
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context limit
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(slots=True, kw_only=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False


@dataclass(slots=True, kw_only=True)
class ChatRequest:
    model: str
    messages: list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    #: Ask the backend for usage (OpenAI ``stream_options.include_usage``); the event
    #: stream always carries usage, this only says whether the client wants to see it.
    include_usage: bool = False
    #: Opaque per-request options a protocol passes through (``user``, ``metadata`` …).
    extra: dict[str, Any] = field(default_factory=dict)
