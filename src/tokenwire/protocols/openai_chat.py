"""OpenAI chat completions: wire models, ``parse`` into a ChatRequest, ``render`` events.

No model calls here (vLLM's protocol/serving split). Rendering follows OpenAI's chunk format:
the first chunk carries ``delta.role``, the last content chunk carries ``finish_reason``,
``stream_options.include_usage`` adds a chunk with empty ``choices`` and ``usage``, then
``[DONE]``.

Deliberate divergences, and why:
- A cancelled stream (Stop, disconnect) ends with ``finish_reason: "stop"``: OpenAI has no
  "cancelled" reason and strict clients reject unknown ones. The native protocol and the
  ``X-Stream-Id`` stream's events say ``stream.cancelled`` with the reason.
- A failure after the first chunk is a chunk ``{"error": {…}}`` followed by ``[DONE]``, which
  the official ``openai`` client raises as ``APIError``; OpenAI itself drops the connection.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tokenwire.errors import InvalidRequest, TokenwireError, error_from_dict
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
from tokenwire.requests import (
    COALESCE_KEY,
    ChatRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolCall,
    parse_coalesce,
)

__all__ = [
    "DONE",
    "PROTOCOL",
    "ChatCompletionRequest",
    "OpenAIChat",
    "Renderer",
    "aggregate",
    "error_body",
    "parse",
]

#: The sentinel payload that ends an OpenAI stream.
DONE = "[DONE]"

# -- wire models ---------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class FunctionCall(_Wire):
    name: str
    arguments: str = ""


class WireToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[WireToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Wire):
    include_usage: bool = False


class FunctionDef(_Wire):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    strict: bool | None = None


class ToolDef(_Wire):
    type: Literal["function"]
    function: FunctionDef


class JsonSchemaFormat(_Wire):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatWire(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Wire):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logprobs: bool | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormatWire | None = None
    user: str | None = None
    #: vLLM's extension: the final assistant message is a prefill the answer continues.
    continue_final_message: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value


# -- parse ---------------------------------------------------------------------------------


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"]
    if first["type"] == "greater_than_equal" and first["loc"][-1:] == ("n",):
        message = "n must be 1: tokenwire generates one choice per request"
    if first["type"] == "less_than_equal" and first["loc"][-1:] == ("n",):
        message = "n > 1 is not supported: tokenwire generates one choice per request"
    if first["type"] == "literal_error" and first["loc"][-1:] == ("role",):
        message = f"unknown role {first.get('input')!r}: {first['msg']}"
    return InvalidRequest(f"Invalid request: {param}: {message}", param=param)


def parse(body: Any) -> tuple[ChatRequest, ChatCompletionRequest]:
    """Validate an already-decoded JSON body; raise ``InvalidRequest`` with the param."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        wire = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    if wire.stream_options is not None and not wire.stream:
        raise InvalidRequest(
            "stream_options is only allowed when stream is true.", param="stream_options"
        )
    messages = []
    for index, message in enumerate(wire.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(
                "A tool message needs tool_call_id.", param=f"messages.{index}.tool_call_id"
            )
        if message.content is None and not message.tool_calls:
            raise InvalidRequest("A message needs content.", param=f"messages.{index}.content")
        messages.append(
            Message(
                role="system" if message.role == "developer" else message.role,
                content=message.text(),
                name=message.name,
                tool_calls=[
                    ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
                    for call in message.tool_calls or []
                ],
                tool_call_id=message.tool_call_id,
            )
        )
    if all(not m.content.strip() and not m.tool_calls for m in messages):
        raise InvalidRequest("messages must contain some content.", param="messages")
    stop = [wire.stop] if isinstance(wire.stop, str) else list(wire.stop or [])
    if any(s == "" for s in stop):
        raise InvalidRequest("stop sequences must not be empty.", param="stop")
    response_format = ResponseFormat()
    if wire.response_format is not None:
        fmt = wire.response_format
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidRequest(
                    "response_format json_schema needs a json_schema object.",
                    param="response_format.json_schema",
                )
            response_format = ResponseFormat(
                type="json_schema",
                schema=fmt.json_schema.schema_,
                name=fmt.json_schema.name,
                strict=bool(fmt.json_schema.strict),
            )
        else:
            response_format = ResponseFormat(type=fmt.type)
    sampling = SamplingParams(
        max_tokens=wire.max_completion_tokens or wire.max_tokens,
        temperature=1.0 if wire.temperature is None else wire.temperature,
        top_p=1.0 if wire.top_p is None else wire.top_p,
        seed=wire.seed,
        stop=stop,
        presence_penalty=wire.presence_penalty or 0.0,
        frequency_penalty=wire.frequency_penalty or 0.0,
    )
    request = ChatRequest(
        model=wire.model,
        messages=messages,
        sampling=sampling,
        tools=[
            Tool(
                name=tool.function.name,
                description=tool.function.description,
                parameters=tool.function.parameters,
            )
            for tool in wire.tools or []
        ],
        tool_choice=wire.tool_choice,
        response_format=response_format,
        include_usage=bool(wire.stream_options and wire.stream_options.include_usage),
        continue_final_message=wire.continue_final_message,
        extra={"user": wire.user} if wire.user else {},
    )
    if wire.continue_final_message and messages[-1].role != "assistant":
        raise InvalidRequest(
            "continue_final_message needs a final assistant message to continue.",
            param="continue_final_message",
        )
    coalesce = (wire.stream_options.model_extra or {}) if wire.stream_options else {}
    if "coalesce" in coalesce:  # tokenwire's extension: fewer, larger frames (opt-in)
        request.extra[COALESCE_KEY] = parse_coalesce(coalesce["coalesce"])
    return request, wire


def error_body(exc: TokenwireError) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": exc.param,
            "code": exc.code,
        }
    }


# -- render --------------------------------------------------------------------------------


def completion_id(stream_id: str) -> str:
    return PROTOCOL.public_id(stream_id)


class Renderer(BaseRenderer):
    """Turns one stream's events into OpenAI chunk payloads, for one reader.

    Stateful only where OpenAI's order differs from the journal's: usage arrives before the
    terminal event in the journal, after the finish chunk on the wire.
    """

    #: Native-only detail: OpenAI's chunks have no place for these.
    drops = frozenset(
        {
            JsonPartial.type,
            Progress.type,
            ToolCallCompleted.type,
            ToolResult.type,
            GuardTriggered.type,
        }
    )

    def __init__(self, meta: StreamMeta) -> None:
        super().__init__(meta)
        self.include_usage = bool(meta.render.get("include_usage"))
        self._base = {
            "id": completion_id(meta.id),
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": None,
        }
        self._usage: Usage | None = None
        self._tool_calls = False
        # A text chunk is the same JSON but for its content: encode the rest once, splice.
        head, _, tail = orjson.dumps(self._chunk({"content": ""})).rpartition(b'"content":""')
        self._text_head = head + b'"content":'
        self._text_tail = tail

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            **self._base,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    def render(self, event: Event) -> list[dict[str, Any] | str | bytes]:
        """Payloads (JSON-able dicts, encoded JSON bytes, or the ``[DONE]`` string) for one
        event."""
        if isinstance(event, TextDelta):
            return [self._text_head + orjson.dumps(event.text) + self._text_tail]
        if isinstance(event, StreamStarted):
            return [self._chunk({"role": "assistant", "content": ""})]
        if isinstance(event, ToolCallStarted):
            self._tool_calls = True
            call = {
                "index": event.index,
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        if isinstance(event, ToolCallDelta):
            call = {"index": event.index, "function": {"arguments": event.arguments_delta}}
            return [self._chunk({"tool_calls": [call]})]
        if isinstance(event, Usage):
            self._usage = event
            return []
        if isinstance(event, StreamCompleted | StreamCancelled):
            reason = event.finish_reason if isinstance(event, StreamCompleted) else "stop"
            out: list[dict[str, Any] | str | bytes] = [self._chunk({}, reason)]
            if self.include_usage and self._usage is not None:
                out.append({**self._base, "choices": [], "usage": usage_dict(self._usage)})
            out.append(DONE)
            return out
        if isinstance(event, StreamFailed):
            # An output validation error names the JSON path where the output went wrong.
            return [{"error": {**event.error, "param": event.error.get("path")}}, DONE]
        return []  # ``drops``


def usage_dict(usage: Usage) -> dict[str, Any]:
    data: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.cached_tokens is not None:
        data["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return data


def aggregate(meta: StreamMeta, events: list[Event]) -> dict[str, Any] | TokenwireError:
    """A non-streaming ``chat.completion`` from a finished stream's events."""
    text: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    usage: Usage | None = None
    finish_reason = "stop"
    for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ToolCallCompleted):
            tool_calls[event.index] = {
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": event.arguments},
            }
        elif isinstance(event, Usage):
            usage = event
        elif isinstance(event, StreamCompleted):
            finish_reason = event.finish_reason
        elif isinstance(event, StreamFailed):
            return error_from_dict(event.error)
        elif isinstance(event, JsonPartial):
            pass
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if tool_calls:
        message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    elif message["content"] is None:
        message["content"] = ""
    body: dict[str, Any] = {
        "id": completion_id(meta.id),
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if usage is not None:
        body["usage"] = usage_dict(usage)
    return body


# -- the protocol --------------------------------------------------------------------------

#: OpenAI's error shape as JSON Schema.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


class OpenAIChat(WireProtocol):
    """``POST /v1/chat/completions``, ``stream`` true or false."""

    name = "openai_chat"
    id_prefix = "chatcmpl-"
    error_schema = ERROR_SCHEMA
    request_model = ChatCompletionRequest

    def routes(self) -> tuple[Endpoint, ...]:
        return (
            Endpoint(
                path="/v1/chat/completions",
                method="POST",
                handler=self.create,
                operation_id="createChatCompletion",
                body=self.request_model,
                summary="A completion, or its SSE stream",
            ),
        )

    def parse(self, body: Any) -> Parsed:
        chat, wire = parse(body)
        return Parsed(
            request=chat, stream=wire.stream, render={"include_usage": chat.include_usage}
        )

    def renderer(self, meta: StreamMeta) -> Renderer:
        return Renderer(meta)

    def aggregate(self, meta: StreamMeta, events: list[Event]) -> dict[str, Any] | TokenwireError:
        return aggregate(meta, events)

    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        return error_body(exc)


PROTOCOL = OpenAIChat()
