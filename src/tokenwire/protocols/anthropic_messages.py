"""Anthropic Messages: wire models, ``parse`` into a ChatRequest, ``Renderer``, ``aggregate``.

No model calls here. A stream renders as Anthropic's SSE does: ``message_start``, a ``ping``,
then per content block ``content_block_start`` / ``content_block_delta`` /
``content_block_stop`` (text blocks with ``text_delta``; tool calls as ``tool_use`` blocks with
``input_json_delta``), ``message_delta`` with ``stop_reason`` and ``usage``, ``message_stop``.
A failure is an ``error`` event, the stream's last. Every error response of ``/v1/messages``
has Anthropic's shape ``{"type": "error", "error": {"type", "message"}}``.

Deliberate divergences, and why:
- ``message_start`` reports ``input_tokens: 0``: tokens are counted as the answer streams;
  the real count comes in ``message_delta.usage`` (which the official client applies).
- A cancelled stream (Stop, disconnect) ends ``end_turn`` + ``message_stop``: Anthropic has
  no "cancelled" reason. The native protocol says ``stream.cancelled``.
- The renderer needs the blocks opened so far, so a resume re-renders the stream from its
  start and sends only what follows the client's last event id (``needs_history``).
- Images, documents and server tools are refused with a 400: the backends are text-only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenwire.errors import InvalidRequest, TokenwireError
from tokenwire.events import (
    Event,
    GuardTriggered,
    JsonPartial,
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
from tokenwire.protocols.base import Endpoint, Parsed, WireProtocol
from tokenwire.protocols.base import Renderer as BaseRenderer
from tokenwire.requests import ChatRequest, Message, SamplingParams, Tool, ToolCall

__all__ = [
    "PROTOCOL",
    "AnthropicMessages",
    "MessagesRequest",
    "Renderer",
    "aggregate",
    "error_body",
    "parse",
]

# -- wire models ---------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Wire):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Wire):
    type: Literal["tool_use"]
    id: str
    name: str
    input: Any = None


class ToolResultBlock(_Wire):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class OtherBlock(_Wire):
    """Any block type we do not serve (image, document, thinking…): refused in ``parse``."""

    type: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class WireMessage(_Wire):
    role: Literal["user", "assistant"]
    content: str | list[Block | OtherBlock]


class ToolDef(_Wire):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=dict)


class ToolChoice(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class Metadata(_Wire):
    user_id: str | None = None


class MessagesRequest(_Wire):
    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)]
    messages: Annotated[list[WireMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None


# -- errors --------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    410: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _anthropic_type(status: int, error_type: str | None) -> str:
    if error_type in _ERROR_TYPES.values():
        return str(error_type)
    return _ERROR_TYPES.get(status, "api_error")


def error_body(exc: TokenwireError) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return {
        "type": "error",
        "error": {"type": _anthropic_type(exc.status_code, exc.error_type), "message": exc.message},
    }


# -- parse ---------------------------------------------------------------------------------


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return InvalidRequest(f"{param}: {first['msg']}", param=param)


def _arguments(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def parse(body: Any) -> tuple[ChatRequest, MessagesRequest]:
    """Validate a decoded JSON body; raise ``InvalidRequest`` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        wire = MessagesRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    messages: list[Message] = []
    if wire.system:
        system = (
            wire.system
            if isinstance(wire.system, str)
            else "".join(block.text for block in wire.system)
        )
        messages.append(Message(role="system", content=system))
    for index, turn in enumerate(wire.messages):
        _append_turn(index, turn, messages)
    if all(not m.content.strip() and not m.tool_calls for m in messages):
        raise InvalidRequest("messages must contain some content.", param="messages")
    stop = list(wire.stop_sequences or [])
    if any(s == "" for s in stop):
        raise InvalidRequest("stop_sequences must not be empty strings.", param="stop_sequences")
    request = ChatRequest(
        model=wire.model,
        messages=messages,
        sampling=SamplingParams(
            max_tokens=wire.max_tokens,
            temperature=1.0 if wire.temperature is None else wire.temperature,
            top_p=1.0 if wire.top_p is None else wire.top_p,
            stop=stop,
        ),
        tools=[
            Tool(name=tool.name, description=tool.description, parameters=tool.input_schema)
            for tool in wire.tools or []
        ],
        tool_choice=_tool_choice(wire.tool_choice),
        include_usage=True,
        # A final assistant turn is a prefill the answer continues (Anthropic's semantics).
        continue_final_message=messages[-1].role == "assistant" and not messages[-1].tool_calls,
        extra={"user": wire.metadata.user_id} if wire.metadata and wire.metadata.user_id else {},
    )
    return request, wire


def _append_turn(index: int, turn: WireMessage, out: list[Message]) -> None:
    """Append one turn of ``messages``: its tool results (``tool`` messages) first, then its
    text and tool calls as one message."""
    if isinstance(turn.content, str):
        out.append(Message(role=turn.role, content=turn.content))
        return
    text: list[str] = []
    calls: list[ToolCall] = []
    for position, block in enumerate(turn.content):
        where = f"messages.{index}.content.{position}"
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            if turn.role != "assistant":
                raise InvalidRequest("tool_use blocks belong to assistant turns.", param=where)
            calls.append(ToolCall(id=block.id, name=block.name, arguments=_arguments(block.input)))
        elif isinstance(block, ToolResultBlock):
            out.append(Message(role="tool", content=block.text(), tool_call_id=block.tool_use_id))
        elif block.type in ("text", "tool_use", "tool_result"):
            raise InvalidRequest(
                f"malformed {block.type} block: a required field is missing or mistyped.",
                param=where,
            )
        else:
            raise InvalidRequest(
                f"content blocks of type {block.type!r} are not supported here.",
                param=f"{where}.type",
            )
    if text or calls:
        out.append(Message(role=turn.role, content="".join(text), tool_calls=calls))


def _tool_choice(choice: ToolChoice | None) -> str | dict[str, Any] | None:
    """Anthropic's ``tool_choice`` in the neutral request's (OpenAI's) terms."""
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest("tool_choice of type tool needs a name.", param="tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


# -- render --------------------------------------------------------------------------------

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def message_id(stream_id: str) -> str:
    return PROTOCOL.public_id(stream_id)


def _usage(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    if not usage.cached_tokens:
        return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
    # Anthropic counts cache reads apart: input_tokens are the ones processed anew.
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


class Renderer(BaseRenderer):
    """One stream's events as Anthropic SSE payloads (``event:`` = the payload's type)."""

    event_names = True
    #: Block indices depend on earlier events: a resume replays from the start.
    needs_history = True
    #: Native-only detail: Anthropic's events have no place for these.
    drops = frozenset({JsonPartial.type, Progress.type, ToolResult.type, GuardTriggered.type})

    def __init__(self, meta: StreamMeta) -> None:
        super().__init__(meta)
        self._blocks = 0  # blocks opened so far
        self._open: int | None = None  # index of the open block
        self._text_open = False
        self._tool_blocks: dict[int, int] = {}  # tool index -> block index
        self._usage: Usage | None = None

    def _close(self) -> list[dict[str, Any] | str]:
        if self._open is None:
            return []
        index, self._open, self._text_open = self._open, None, False
        return [{"type": "content_block_stop", "index": index}]

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any] | str]:
        out = self._close()
        self._open = self._blocks
        self._blocks += 1
        out.append({"type": "content_block_start", "index": self._open, "content_block": block})
        return out

    def render(self, event: Event) -> list[dict[str, Any] | str]:
        if isinstance(event, TextDelta):
            out: list[dict[str, Any] | str] = []
            if not self._text_open:
                out = self._start({"type": "text", "text": ""})
                self._text_open = True
            out.append(
                {
                    "type": "content_block_delta",
                    "index": self._open,
                    "delta": {"type": "text_delta", "text": event.text},
                }
            )
            return out
        if isinstance(event, StreamStarted):
            return [
                {
                    "type": "message_start",
                    "message": {
                        "id": message_id(event.id),
                        "type": "message",
                        "role": "assistant",
                        "model": event.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": _usage(None),
                    },
                },
                {"type": "ping"},
            ]
        if isinstance(event, ToolCallStarted):
            out = self._start({"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
            self._tool_blocks[event.index] = self._blocks - 1
            return out
        if isinstance(event, ToolCallDelta):
            index = self._tool_blocks.get(event.index)
            if index is None or not event.arguments_delta:
                return []
            return [
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": event.arguments_delta},
                }
            ]
        if isinstance(event, ToolCallCompleted):
            if self._open is not None and self._open == self._tool_blocks.get(event.index):
                return self._close()
            return []
        if isinstance(event, Usage):
            self._usage = event
            return []
        if isinstance(event, StreamCompleted | StreamCancelled):
            reason = event.finish_reason if isinstance(event, StreamCompleted) else "stop"
            out = self._close()
            out.append(
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": _STOP_REASONS.get(reason, "end_turn"),
                        "stop_sequence": None,
                    },
                    "usage": _usage(self._usage),
                }
            )
            out.append({"type": "message_stop"})
            return out
        if isinstance(event, StreamFailed):
            error = event.error
            status = {"backend_timeout": 504, "backend_unavailable": 503}.get(
                str(error.get("type")), 500
            )
            return [
                {
                    "type": "error",
                    "error": {
                        "type": _anthropic_type(status, error.get("type")),
                        "message": str(error.get("message", "the stream failed")),
                    },
                }
            ]
        return []  # ``drops``


def aggregate(meta: StreamMeta, events: list[Event]) -> dict[str, Any] | TokenwireError:
    """A non-streaming ``message`` from a finished stream's events."""
    content: list[dict[str, Any]] = []
    usage: Usage | None = None
    stop_reason = "end_turn"
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if isinstance(event, TextDelta):
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += event.text
            else:
                content.append({"type": "text", "text": event.text})
        elif isinstance(event, ToolCallStarted):
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": event.id,
                "name": event.name,
                "input": {},
            }
            calls[event.index] = block
            content.append(block)
        elif isinstance(event, ToolCallCompleted):
            done = calls.get(event.index)
            if done is None:
                done = {"type": "tool_use", "id": event.id, "name": event.name}
                content.append(done)
            try:
                done["input"] = orjson.loads(event.arguments) if event.arguments.strip() else {}
            except orjson.JSONDecodeError:
                done["input"] = {"_raw": event.arguments}
        elif isinstance(event, Usage):
            usage = event
        elif isinstance(event, StreamCompleted):
            stop_reason = _STOP_REASONS.get(event.finish_reason, "end_turn")
        elif isinstance(event, StreamFailed):
            exc = TokenwireError(event.error.get("message", "stream failed"))
            exc.error_type = event.error.get("type", "api_error")
            exc.status_code = {"backend_timeout": 504, "backend_unavailable": 503}.get(
                exc.error_type, 502
            )
            return exc
    return {
        "id": message_id(meta.id),
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(usage),
    }


# -- the protocol --------------------------------------------------------------------------

#: Anthropic's error shape as JSON Schema.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


class AnthropicMessages(WireProtocol):
    """``POST /v1/messages``, ``stream`` true or false."""

    name = "anthropic_messages"
    id_prefix = "msg_"
    error_schema = ERROR_SCHEMA
    request_model = MessagesRequest

    def routes(self) -> tuple[Endpoint, ...]:
        return (
            Endpoint(
                path="/v1/messages",
                method="POST",
                handler=self.create,
                operation_id="createMessage",
                body=self.request_model,
                summary="A message, or its SSE stream",
            ),
        )

    def parse(self, body: Any) -> Parsed:
        chat, wire = parse(body)
        return Parsed(request=chat, stream=wire.stream)

    def renderer(self, meta: StreamMeta) -> Renderer:
        return Renderer(meta)

    def aggregate(self, meta: StreamMeta, events: list[Event]) -> dict[str, Any] | TokenwireError:
        return aggregate(meta, events)

    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        return error_body(exc)


PROTOCOL = AnthropicMessages()
