"""The OpenAI Responses API: ``/v1/responses``, streaming, background, resume, cancel.

No model calls here. A response is a stream: ``resp_<stream id>``. Its events render as the
official ``openai`` SDK reads them: ``response.created``, ``response.in_progress``, then per
output item ``response.output_item.added`` … ``response.output_item.done`` (a message: its
``content_part.added``, ``output_text.delta``s, ``output_text.done``, ``content_part.done``; a
function call: ``function_call_arguments.delta``s and ``.done``), and one terminal event:
``response.completed``, ``response.incomplete`` (``max_output_tokens``, ``content_filter``),
``response.failed`` (after a flat ``error`` event) or ``response.cancelled``. Open output
items are closed (``status: "incomplete"``) before any terminal event but the completed one,
so partial output is kept. Each event carries ``sequence_number``, dense from 0, which is also
its SSE ``id:``; ``output_index`` / ``content_index`` are dense.

Several wire events come from one journal event, so positions are the renderer's own
(``Renderer.position_key``): a resume (``GET /v1/responses/{id}?stream=true&starting_after=N``
or ``Last-Event-ID``) renders the stream from its start, deterministically, and sends what
follows ``N``. Any replica can serve it: everything the renderer needs is in the journal
(``StreamMeta.render`` holds the request's echo fields, its input items and the
conversation before it).

Stored responses: every response lives in the journal for its TTL (``store: false`` ones too,
but those answer 404 to ``GET``, as OpenAI's do). ``background: true`` starts a stream that
keeps generating with no reader (``Parsed.background``); the POST answers at once. ``GET``
polls (the response rendered from the events so far), ``POST …/cancel`` stops the model on
whichever replica produces it and answers the final object, ``DELETE`` drops it,
``GET …/input_items`` lists what was sent. ``previous_response_id`` continues from a stored
response: its context, input and output (not its ``instructions``).

The WebSocket mode (``client.responses.connect()``) takes ``response.create`` frames on
``/v1/responses`` and sends the same event objects back (with the frame's ``stream_id``
lane, when it named one), one response in flight per connection; ``previous_response_id``
may name the connection's last response even when it was not stored.

Deliberate divergences, and why:
- A cancelled response's stream ends with ``response.cancelled`` (its ``response.status`` is
  ``cancelled``). OpenAI documents no terminal stream event for a cancel and its SDK types
  have none: every reader must still get a terminal event and a closed stream, and
  ``response.incomplete`` or ``response.failed`` would misreport a Stop. The SDK passes the
  event through by its ``type``; ``get_final_response()`` raises, as for any response that
  did not complete.
- ``output_text.delta`` carries ``logprobs: []``: logprobs are not offered (``include`` of
  ``message.output_text.logprobs`` and ``top_logprobs`` > 0 are refused with a 400).
- Built-in tools (web search, file search, code interpreter, MCP…), images, files, reasoning
  and ``truncation: "auto"`` are refused with a 400: the backends are text-only, and a
  request that silently lost them would mean something else.
- ``seed`` is accepted as an extension (the SDK's ``extra_body``): a seeded run is
  reproducible on the embedded model.
- A failed create answers with ``x-should-retry: false``: the SDK would otherwise retry a
  5xx and start a second generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from tokenwire.errors import (
    InvalidRequest,
    StreamExpired,
    StreamNotFound,
    TokenwireError,
    error_from_dict,
)
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
from tokenwire.protocols.base import (
    Context,
    Endpoint,
    JSONResponse,
    Parsed,
    Payload,
    Renderer,
    Reply,
    WireProtocol,
)
from tokenwire.requests import (
    ChatRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolCall,
)

__all__ = ["PROTOCOL", "OpenAIResponses", "ResponsesRenderer", "history", "snapshot"]

ID_PREFIX = "resp_"

# -- errors ----------------------------------------------------------------------------------

_ERROR_SCHEMA: dict[str, Any] = {
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


def _error_body(exc: TokenwireError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": exc.param,
            "code": exc.code,
        }
    }


def _not_found(public_id: str) -> StreamNotFound:
    return StreamNotFound(f"Response with id '{public_id}' not found.", param="response_id")


# -- parse -----------------------------------------------------------------------------------

#: Top-level fields understood as they are.
_FIELDS = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "store",
    "background",
    "previous_response_id",
    "metadata",
    "stream",
    "stream_options",
    "user",
    "seed",
    # Accepted when they ask for nothing tokenwire would do differently (checked below).
    "include",
    "truncation",
    "service_tier",
    "reasoning",
    "top_logprobs",
    "max_tool_calls",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
}


class ResponseCreateBody(BaseModel):
    """The create body as documented in ``/openapi.json`` (``parse_body`` checks it)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    stream: bool | None = None
    user: str | None = None
    seed: int | None = None


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequest(message, param=param)


def _text_of(content: Any, param: str, allowed: tuple[str, ...]) -> str:
    """The text of a message's ``content``: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    _check(isinstance(content, list), "content must be a string or a list of parts.", param)
    texts: list[str] = []
    for index, part in enumerate(content):
        where = f"{param}.{index}"
        _check(isinstance(part, dict), "a content part must be an object.", where)
        kind = part.get("type")
        if kind not in allowed:
            raise InvalidRequest(
                f"content parts of type {kind!r} are not supported here (text only: "
                f"{', '.join(allowed)}).",
                param=f"{where}.type",
            )
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        _check(isinstance(text, str), f"a {kind} part needs its text.", where)
        texts.append(text)
    return "".join(texts)


_INPUT_PARTS = ("input_text", "output_text", "refusal")


def _normalize_input(raw: Any) -> list[dict[str, Any]]:
    """The ``input`` as a list of items (each checked), in the shape ``input_items`` lists."""
    if isinstance(raw, str):
        return [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": raw}],
            }
        ]
    _check(isinstance(raw, list), "input must be a string or a list of items.", "input")
    _check(bool(raw), "input must not be empty.", "input")
    items: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        where = f"input.{index}"
        _check(isinstance(item, dict), "an input item must be an object.", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            _check(
                role in ("user", "assistant", "system", "developer"),
                f"unknown role {role!r}: one of user, assistant, system, developer.",
                f"{where}.role",
            )
            text = _text_of(item.get("content"), f"{where}.content", _INPUT_PARTS)
            part = "output_text" if role == "assistant" else "input_text"
            normalized: dict[str, Any] = {
                "type": "message",
                "role": role,
                "content": [{"type": part, "text": text}],
            }
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                _check(
                    isinstance(item.get(name), str),
                    f"a function_call item needs {name} (a string).",
                    f"{where}.{name}",
                )
            normalized = {
                "type": "function_call",
                "call_id": item["call_id"],
                "name": item["name"],
                "arguments": item["arguments"],
            }
        elif kind == "function_call_output":
            _check(
                isinstance(item.get("call_id"), str),
                "a function_call_output item needs call_id (a string).",
                f"{where}.call_id",
            )
            output = _text_of(item.get("output"), f"{where}.output", ("input_text",))
            normalized = {
                "type": "function_call_output",
                "call_id": item["call_id"],
                "output": output,
            }
        else:
            raise InvalidRequest(
                f"input items of type {kind!r} are not supported here (message, "
                "function_call, function_call_output).",
                param=f"{where}.type",
            )
        if isinstance(item.get("id"), str):
            normalized["id"] = item["id"]
        items.append(normalized)
    return items


def _items_to_messages(items: list[dict[str, Any]], out: list[Message]) -> None:
    """Append ``items`` (normalized input or output items) to a conversation."""
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = item["role"]
            text = "".join(part.get("text", "") for part in item.get("content") or [])
            out.append(
                Message(role="system" if role in ("system", "developer") else role, content=text)
            )
        elif kind == "function_call":
            call = ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"])
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                last.tool_calls.append(call)  # parallel calls: one assistant turn
            else:
                out.append(Message(role="assistant", content="", tool_calls=[call]))
        elif kind == "function_call_output":
            out.append(Message(role="tool", content=item["output"], tool_call_id=item["call_id"]))


def _message_dict(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    return data


def _message_from(data: dict[str, Any]) -> Message:
    return Message(
        role=data["role"],
        content=data["content"],
        tool_calls=[ToolCall(**call) for call in data.get("tool_calls", [])],
        tool_call_id=data.get("tool_call_id"),
    )


def _tools(raw: Any) -> tuple[list[Tool], list[dict[str, Any]]]:
    if raw is None:
        return [], []
    _check(isinstance(raw, list), "tools must be a list.", "tools")
    tools: list[Tool] = []
    echo: list[dict[str, Any]] = []
    for index, tool in enumerate(raw):
        where = f"tools.{index}"
        _check(isinstance(tool, dict), "a tool must be an object.", where)
        if tool.get("type") != "function":
            raise InvalidRequest(
                f"tools of type {tool.get('type')!r} are not supported here: only function "
                "tools (the backends run no built-in tools).",
                param=f"{where}.type",
            )
        name = tool.get("name")
        _check(
            isinstance(name, str) and 0 < len(name) <= 64,
            "a function tool needs a name (1-64 characters).",
            f"{where}.name",
        )
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        _check(isinstance(parameters, dict), "parameters must be a JSON Schema.", where)
        description = tool.get("description") or ""
        _check(isinstance(description, str), "description must be a string.", where)
        tools.append(Tool(name=name, description=description, parameters=parameters))
        echo.append(
            {
                "type": "function",
                "name": name,
                "description": description or None,
                "parameters": parameters,
                "strict": tool.get("strict", True),
            }
        )
    return tools, echo


def _tool_choice(raw: Any, tools: list[Tool]) -> str | dict[str, Any] | None:
    if raw is None or raw in ("auto", "none", "required"):
        return raw  # type: ignore[no-any-return]
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        _check(
            any(tool.name == raw["name"] for tool in tools),
            f"tool_choice names {raw['name']!r}, which is not in tools.",
            "tool_choice.name",
        )
        return {"type": "function", "function": {"name": raw["name"]}}
    raise InvalidRequest(
        "tool_choice must be auto, none, required or {type: function, name}.",
        param="tool_choice",
    )


def _text_format(raw: Any) -> tuple[ResponseFormat, dict[str, Any]]:
    if raw is None:
        return ResponseFormat(), {"format": {"type": "text"}}
    _check(isinstance(raw, dict), "text must be an object.", "text")
    for key in raw:
        if key not in ("format", "verbosity"):
            raise InvalidRequest(f"text.{key} is not supported.", param=f"text.{key}")
    fmt = raw.get("format") or {"type": "text"}
    _check(isinstance(fmt, dict), "text.format must be an object.", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return ResponseFormat(), {"format": {"type": "text"}}
    if kind == "json_object":
        return ResponseFormat(type="json_object"), {"format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = fmt.get("schema")
        _check(isinstance(schema, dict), "text.format.schema must be an object.", "text.format")
        name = fmt.get("name") or "response"
        strict = bool(fmt.get("strict"))
        echo = {"type": "json_schema", "name": name, "schema": schema, "strict": strict}
        if fmt.get("description"):
            echo["description"] = fmt["description"]
        return ResponseFormat(type="json_schema", schema=schema, name=name, strict=strict), {
            "format": echo
        }
    raise InvalidRequest(
        f"text.format.type {kind!r}: one of text, json_object, json_schema.",
        param="text.format.type",
    )


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    _check(
        isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high,
        f"{name} must be a number from {low:g} to {high:g}.",
        name,
    )
    return float(value)


def parse_body(body: Any) -> dict[str, Any]:
    """Check a create body's fields (the parts that need no journal); return it."""
    _check(isinstance(body, dict), "The request body must be a JSON object.", "body")
    for key in body:
        if key not in _FIELDS:
            raise InvalidRequest(f"Unsupported parameter: '{key}'.", param=str(key))
    _check(
        isinstance(body.get("model"), str) and bool(body["model"]),
        "model is required (a string).",
        "model",
    )
    _check("input" in body, "input is required.", "input")
    for name in ("stream", "store", "background", "parallel_tool_calls"):
        value = body.get(name)
        _check(value is None or isinstance(value, bool), f"{name} must be a boolean.", name)
    if body.get("background") and body.get("store") is False:
        raise InvalidRequest("background mode requires store: true.", param="background")
    instructions = body.get("instructions")
    _check(
        instructions is None or isinstance(instructions, str),
        "instructions must be a string.",
        "instructions",
    )
    max_output = body.get("max_output_tokens")
    _check(
        max_output is None
        or (isinstance(max_output, int) and not isinstance(max_output, bool) and max_output >= 1),
        "max_output_tokens must be an integer >= 1.",
        "max_output_tokens",
    )
    user = body.get("user")
    _check(user is None or isinstance(user, str), "user must be a string.", "user")
    seed = body.get("seed")
    _check(
        seed is None or (isinstance(seed, int) and not isinstance(seed, bool)),
        "seed must be an integer.",
        "seed",
    )
    metadata = body.get("metadata")
    _check(
        metadata is None
        or (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
        ),
        "metadata must be at most 16 string values.",
        "metadata",
    )
    previous = body.get("previous_response_id")
    _check(
        previous is None or isinstance(previous, str),
        "previous_response_id must be a string.",
        "previous_response_id",
    )
    # Fields accepted only where they ask for what tokenwire does anyway.
    _check(
        not body.get("include"),
        "include is not supported (no logprobs, no tools' extra output).",
        "include",
    )
    _check(
        body.get("truncation") in (None, "disabled"),
        "truncation 'auto' is not supported: a prompt that does not fit is a 400.",
        "truncation",
    )
    _check(
        body.get("service_tier") in (None, "auto", "default"),
        "service_tier: only auto or default.",
        "service_tier",
    )
    reasoning = body.get("reasoning")
    _check(
        not reasoning or (isinstance(reasoning, dict) and not any(reasoning.values())),
        "reasoning is not supported by these models.",
        "reasoning",
    )
    _check(not body.get("top_logprobs"), "top_logprobs is not supported.", "top_logprobs")
    options = body.get("stream_options")
    _check(
        options is None or (isinstance(options, dict) and set(options) <= {"include_obfuscation"}),
        "stream_options: only include_obfuscation (ignored: nothing is obfuscated).",
        "stream_options",
    )
    checked: dict[str, Any] = body
    return checked


def build(body: dict[str, Any], *, context: list[Message] | None = None) -> Parsed:
    """A checked body (``parse_body``) and the conversation it continues, as a ``Parsed``."""
    items = _normalize_input(body["input"])
    batch = secrets.token_hex(6)  # input item ids: stored with the response, so stable
    for index, item in enumerate(items):
        item.setdefault("id", f"{_ITEM_PREFIX[item['type']]}_{batch}{index}")
    tools, tools_echo = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    response_format, text_echo = _text_format(body.get("text"))
    if response_format.type != "text" and tools and tool_choice == "required":
        raise InvalidRequest(
            "text.format and a required tool call exclude each other.", param="text"
        )
    messages: list[Message] = []
    instructions = body.get("instructions")
    if instructions:
        messages.append(Message(role="system", content=instructions))
    prior = list(context or [])
    messages.extend(prior)
    _items_to_messages(items, messages)
    if all(not m.content.strip() and not m.tool_calls for m in messages):
        raise InvalidRequest("input must contain some content.", param="input")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    _check(top_p is None or top_p > 0, "top_p must be greater than 0.", "top_p")
    request = ChatRequest(
        model=body["model"],
        messages=messages,
        sampling=SamplingParams(
            max_tokens=body.get("max_output_tokens"),
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=body.get("seed"),
        ),
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
        include_usage=True,
        extra={"user": body["user"]} if body.get("user") else {},
    )
    background = bool(body.get("background"))
    echo = {
        "background": background,
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "service_tier": "default",
        "store": body.get("store", True) is not False,
        "temperature": 1.0 if temperature is None else temperature,
        "text": text_echo,
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": tools_echo,
        "top_p": 1.0 if top_p is None else top_p,
        "truncation": "disabled",
        "user": body.get("user"),
    }
    return Parsed(
        request=request,
        stream=bool(body.get("stream")),
        background=background,
        render={
            "response": echo,
            "input": items,
            "context": [_message_dict(m) for m in prior],
        },
    )


#: Id prefixes of items, by type.
_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


# -- render ----------------------------------------------------------------------------------


def response_id(stream_id: str) -> str:
    return ID_PREFIX + stream_id


#: The terminal event type for each final status.
_TERMINAL = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.cancelled",
}

_RESPONSE_ERROR_CODES = {"rate_limit_error": "rate_limit_exceeded"}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens or 0,
            "cache_write_tokens": 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponsesRenderer(Renderer):
    """One response's events as Responses API events, numbered by ``sequence_number``.

    Deterministic: the same events give the same payloads, on any replica, so a resume
    re-renders from the start and skips what the client has. ``response()`` is the Response
    object as of the events rendered so far (what ``GET`` polls and the POST answers).
    """

    event_names = True
    needs_history = True
    position_key: ClassVar[str | None] = "sequence_number"
    #: Native-only detail: the Responses API's events have no place for these.
    drops = frozenset({Progress.type, JsonPartial.type, GuardTriggered.type, ToolResult.type})

    def __init__(self, meta: StreamMeta) -> None:
        super().__init__(meta)
        self._echo: dict[str, Any] = dict(meta.render.get("response") or {})
        self._id = response_id(meta.id)
        self._stream_id = meta.id
        self._seq = 0
        self._status = "queued" if self._echo.get("background") else "in_progress"
        self._output: list[dict[str, Any]] = []
        self._message: int | None = None  # output index of the open message
        self._message_id = ""
        self._text: list[str] = []
        self._calls: dict[int, int] = {}  # tool call index -> output index
        self._open_calls: set[int] = set()  # output indices of unfinished calls
        self._usage: Usage | None = None
        self._error: dict[str, Any] | None = None
        self._incomplete: dict[str, Any] | None = None
        self._started = False

    # -- the Response object ----------------------------------------------------------------

    @property
    def status(self) -> str:
        return self._status

    def response(self) -> dict[str, Any]:
        """The Response object as of now (a fresh dict)."""
        output = copy.deepcopy(self._output)
        if self._message is not None:
            output[self._message]["content"] = [self._part("".join(self._text))]
        return {
            "id": self._id,
            "object": "response",
            "created_at": self.meta.created,
            "status": self._status,
            "error": self._error,
            "incomplete_details": self._incomplete,
            "model": self.meta.model,
            "output": output,
            "usage": _usage(self._usage) if self._usage is not None else None,
            **self._echo,
        }

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _emit(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["sequence_number"] = self._seq
        self._seq += 1
        return payload

    def _lifecycle(self, kind: str) -> dict[str, Any]:
        return self._emit({"type": kind, "response": self.response()})

    # -- output items -----------------------------------------------------------------------

    def _open_message(self) -> list[Payload]:
        index = len(self._output)
        self._message = index
        self._message_id = f"msg_{self._stream_id}_{index}"
        self._text = []
        item = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self._output.append(item)
        return [
            self._emit(
                {"type": "response.output_item.added", "output_index": index, "item": dict(item)}
            ),
            self._emit(
                {
                    "type": "response.content_part.added",
                    "item_id": self._message_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": self._part(""),
                }
            ),
        ]

    def _close_message(self, status: str) -> list[Payload]:
        index = self._message
        if index is None:
            return []
        self._message = None
        text = "".join(self._text)
        item = self._output[index]
        item["content"] = [self._part(text)]
        item["status"] = status
        head = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            self._emit({"type": "response.output_text.done", **head, "text": text, "logprobs": []}),
            self._emit({"type": "response.content_part.done", **head, "part": self._part(text)}),
            self._emit(
                {
                    "type": "response.output_item.done",
                    "output_index": index,
                    "item": copy.deepcopy(item),
                }
            ),
        ]

    def _open_call(self, call_index: int, call_id: str, name: str) -> list[Payload]:
        out = self._close_message("completed")
        index = len(self._output)
        item = {
            "id": f"fc_{self._stream_id}_{index}",
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": call_id,
            "name": name,
        }
        self._output.append(item)
        self._calls[call_index] = index
        self._open_calls.add(index)
        out.append(
            self._emit(
                {"type": "response.output_item.added", "output_index": index, "item": dict(item)}
            )
        )
        return out

    def _close_call(self, index: int, status: str) -> list[Payload]:
        self._open_calls.discard(index)
        item = self._output[index]
        item["status"] = status
        return [
            self._emit(
                {"type": "response.output_item.done", "output_index": index, "item": dict(item)}
            )
        ]

    def _finish(self, status: str) -> list[Payload]:
        item_status = "completed" if status == "completed" else "incomplete"
        out = self._close_message(item_status)
        for index in sorted(self._open_calls):
            out.extend(self._close_call(index, "incomplete"))
        self._status = status
        out.append(self._lifecycle(_TERMINAL[status]))
        return out

    # -- render -----------------------------------------------------------------------------

    def render(self, event: Event) -> Sequence[Payload]:
        if type(event) is TextDelta:
            if not event.text:
                return []
            out = self._open_message() if self._message is None else []
            self._text.append(event.text)
            out.append(
                self._emit(
                    {
                        "type": "response.output_text.delta",
                        "item_id": self._message_id,
                        "output_index": self._message,
                        "content_index": 0,
                        "delta": event.text,
                        "logprobs": [],
                    }
                )
            )
            return out
        if isinstance(event, StreamStarted):
            if self._started:
                return []  # a stream taken over by another replica goes on: one response
            self._started = True
            created = self._lifecycle("response.created")
            self._status = "in_progress"
            return [created, self._lifecycle("response.in_progress")]
        if isinstance(event, ToolCallStarted):
            return self._open_call(event.index, event.id, event.name)
        if isinstance(event, ToolCallDelta):
            index = self._calls.get(event.index)
            if index is None or index not in self._open_calls or not event.arguments_delta:
                return []
            self._output[index]["arguments"] += event.arguments_delta
            return [
                self._emit(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": self._output[index]["id"],
                        "output_index": index,
                        "delta": event.arguments_delta,
                    }
                )
            ]
        if isinstance(event, ToolCallCompleted):
            done: list[Payload] = []
            index = self._calls.get(event.index)
            if index is None:  # a backend that only reports whole calls
                done = self._open_call(event.index, event.id, event.name)
                index = self._calls[event.index]
            item = self._output[index]
            item["arguments"] = event.arguments
            done.append(
                self._emit(
                    {
                        "type": "response.function_call_arguments.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "name": item["name"],
                        "arguments": event.arguments,
                    }
                )
            )
            done.extend(self._close_call(index, "completed"))
            return done
        if isinstance(event, Usage):
            self._usage = event
            return []
        if isinstance(event, StreamCompleted):
            reason = event.finish_reason
            if reason == "length":
                self._incomplete = {"reason": "max_output_tokens"}
                return self._finish("incomplete")
            if reason == "content_filter":
                self._incomplete = {"reason": "content_filter"}
                return self._finish("incomplete")
            return self._finish("completed")
        if isinstance(event, StreamCancelled):
            return self._finish("cancelled")
        if isinstance(event, StreamFailed):
            error = event.error
            kind = str(error.get("type") or "server_error")
            message = str(error.get("message") or "the response failed")
            param = error.get("path") or error.get("param")
            self._error = {
                "code": _RESPONSE_ERROR_CODES.get(kind, "server_error"),
                "message": message,
                "type": kind,
                "param": param,
            }
            flat = self._emit(
                {
                    "type": "error",
                    "code": error.get("code") or kind,
                    "message": message,
                    "param": param,
                }
            )
            return [flat, *self._finish("failed")]
        return []  # ``drops``


def snapshot(meta: StreamMeta, events: Sequence[Event]) -> ResponsesRenderer:
    """A renderer that has rendered ``events`` (its ``response()`` is the object now)."""
    renderer = ResponsesRenderer(meta)
    for event in events:
        renderer.render(event)
    return renderer


def history(meta: StreamMeta, events: Sequence[Event]) -> list[Message]:
    """The conversation a follow-up of this response continues: what came before it, its
    input and its output (its ``instructions`` are not carried over, as OpenAI's)."""
    messages = [_message_from(m) for m in meta.render.get("context") or []]
    _items_to_messages(meta.render.get("input") or [], messages)
    _items_to_messages(snapshot(meta, events).response()["output"], messages)
    return messages


# -- the protocol ----------------------------------------------------------------------------

_FINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})


class OpenAIResponses(WireProtocol):
    name = "openai_responses"
    id_prefix = ID_PREFIX
    error_schema = _ERROR_SCHEMA
    request_model = ResponseCreateBody

    def routes(self) -> Sequence[Endpoint]:
        rid = (
            {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}},
        )
        return (
            Endpoint(
                path="/v1/responses",
                method="POST",
                handler=self.create_response,
                operation_id="createResponse",
                body=ResponseCreateBody,
            ),
            Endpoint(path="/v1/responses", method="WEBSOCKET", handler=self.socket),
            Endpoint(
                path="/v1/responses/{response_id}",
                method="GET",
                handler=self.retrieve,
                operation_id="getResponse",
                parameters=(
                    *rid,
                    {"name": "stream", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "starting_after", "in": "query", "schema": {"type": "integer"}},
                ),
            ),
            Endpoint(
                path="/v1/responses/{response_id}",
                method="DELETE",
                handler=self.delete,
                operation_id="deleteResponse",
                parameters=rid,
                streams=False,
            ),
            Endpoint(
                path="/v1/responses/{response_id}/cancel",
                method="POST",
                handler=self.cancel,
                operation_id="cancelResponse",
                parameters=rid,
                streams=False,
            ),
            Endpoint(
                path="/v1/responses/{response_id}/input_items",
                method="GET",
                handler=self.input_items,
                operation_id="listInputItems",
                parameters=rid,
                streams=False,
            ),
        )

    def parse(self, body: Any) -> Parsed:
        """A body with no ``previous_response_id`` (that one needs the journal: ``start``)."""
        checked = parse_body(body)
        _check(
            not checked.get("previous_response_id"),
            "previous_response_id needs the server (POST /v1/responses).",
            "previous_response_id",
        )
        return build(checked)

    def renderer(self, meta: StreamMeta) -> ResponsesRenderer:
        return ResponsesRenderer(meta)

    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        return _error_body(exc)

    def aggregate(self, meta: StreamMeta, events: list[Event]) -> dict[str, Any] | TokenwireError:
        for event in events:
            if isinstance(event, StreamFailed):
                return error_from_dict(event.error)
        return snapshot(meta, events).response()

    # -- helpers ----------------------------------------------------------------------------

    async def _stored(
        self, ctx: Context, connection: HTTPConnection, public_id: str, *, unstored: str = ""
    ) -> StreamMeta:
        """A response of this protocol owned by the caller; 404 for anything else (another
        key's, another protocol's stream, one not stored unless it is ``unstored``)."""
        try:
            meta = await ctx.owned_meta(connection, self.stream_id(public_id))
        except (StreamNotFound, StreamExpired) as exc:
            # Past its retention a response is gone, as OpenAI says it: 404 (not 410).
            raise _not_found(public_id) from exc
        if meta.protocol != self.name:
            raise _not_found(public_id)
        if not meta.render.get("response", {}).get("store", True) and public_id != unstored:
            raise _not_found(public_id)
        return meta

    async def _start(
        self, ctx: Context, connection: HTTPConnection, body: Any, *, last: str = ""
    ) -> tuple[Parsed, StreamMeta]:
        checked = parse_body(body)
        context: list[Message] | None = None
        previous = checked.get("previous_response_id")
        if previous:
            prev_meta = await self._stored(ctx, connection, previous, unstored=last)
            events = await ctx.snapshot(prev_meta.id)
            if not events or not events[-1].terminal:
                raise InvalidRequest(
                    f"Previous response '{previous}' is still in progress.",
                    param="previous_response_id",
                )
            context = history(prev_meta, events)
        parsed = build(checked, context=context)
        meta = await ctx.start(self, parsed, connection)
        return parsed, meta

    # -- routes -----------------------------------------------------------------------------

    async def create_response(self, ctx: Context, request: Request) -> Reply:
        try:
            parsed, meta = await self._start(ctx, request, await ctx.read_json(request))
        except TokenwireError as exc:
            # The SDK retries 5xx/429 by default: a retried create is a second generation.
            failed = ctx.error_response(self, exc)
            failed.headers["x-should-retry"] = "false"
            return failed
        if parsed.stream:
            return ctx.event_stream(meta)
        if parsed.background:
            rendered = snapshot(meta, await ctx.snapshot(meta.id))
            return JSONResponse(rendered.response(), headers=ctx.stream_headers(meta))
        events = await ctx.collect(meta, request)
        if events is None:
            return Response(status_code=499)
        body = self.aggregate(meta, events)
        if isinstance(body, TokenwireError):
            failed = ctx.error_response(self, body)
            failed.headers["x-should-retry"] = "false"
            return failed
        return JSONResponse(body, headers=ctx.stream_headers(meta))

    async def retrieve(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        params = request.query_params
        if params.get("stream", "false").lower() not in ("true", "1"):
            events = await ctx.snapshot(meta.id)
            return JSONResponse(snapshot(meta, events).response(), headers=ctx.stream_headers(meta))
        if not meta.render.get("response", {}).get("background"):
            raise InvalidRequest(
                "Only responses created with background: true can be streamed again.",
                param="stream",
            )
        raw = params.get("starting_after") or request.headers.get("last-event-id")
        after = -1
        if raw not in (None, ""):
            try:
                after = int(raw)
            except ValueError as exc:
                raise InvalidRequest(
                    f"starting_after must be an integer, not {raw!r}.", param="starting_after"
                ) from exc
            _check(after >= -1, "starting_after must be >= -1.", "starting_after")
        return await ctx.resume(request, meta.id, after)

    async def cancel(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        if not meta.render.get("response", {}).get("background"):
            raise InvalidRequest(
                "Only responses created with background: true can be cancelled.",
                param="response_id",
            )
        events = await ctx.snapshot(meta.id)
        if events and events[-1].terminal:
            rendered = snapshot(meta, events)
            if rendered.status != "cancelled":
                raise InvalidRequest(
                    f"Cannot cancel a response with status '{rendered.status}'.",
                    param="response_id",
                )
            return JSONResponse(rendered.response(), headers=ctx.stream_headers(meta))
        await ctx.cancel(meta.id, "stop")
        # The final object: read to the terminal event (the producer journals it within a
        # token on the embedded engine, wherever it runs).
        collected = [event async for event in ctx.read(meta.id)]
        return JSONResponse(snapshot(meta, collected).response(), headers=ctx.stream_headers(meta))

    async def delete(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        events = await ctx.snapshot(meta.id)
        if not events or not events[-1].terminal:
            await ctx.cancel(meta.id, "stop")
            async for _ in ctx.read(meta.id):  # until its terminal event is journaled
                pass
        await ctx.delete(meta.id)
        return JSONResponse({"id": public_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, ctx: Context, request: Request) -> Reply:
        public_id = request.path_params["response_id"]
        meta = await self._stored(ctx, request, public_id)
        items = list(meta.render.get("input") or [])
        params = request.query_params
        order = params.get("order", "desc")
        _check(order in ("asc", "desc"), "order must be asc or desc.", "order")
        if order == "desc":
            items.reverse()
        after = params.get("after")
        if after:
            ids = [item["id"] for item in items]
            _check(after in ids, f"No input item '{after}' in this response.", "after")
            items = items[ids.index(after) + 1 :]
        try:
            limit = int(params.get("limit", "20"))
        except ValueError as exc:
            raise InvalidRequest("limit must be an integer.", param="limit") from exc
        _check(1 <= limit <= 100, "limit must be from 1 to 100.", "limit")
        page = items[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [{**item, "status": "completed"} for item in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            }
        )

    # -- WebSocket mode ----------------------------------------------------------------------

    async def socket(self, ctx: Context, websocket: WebSocket) -> None:
        """``client.responses.connect()``: ``response.create`` in, the events out."""
        await websocket.accept()
        session = _Session(self, ctx, websocket)
        try:
            await session.run()
        finally:
            await session.close()


class _Session:
    """One WebSocket connection: one response in flight at a time."""

    def __init__(self, protocol: OpenAIResponses, ctx: Context, websocket: WebSocket) -> None:
        self.protocol = protocol
        self.ctx = ctx
        self.websocket = websocket
        self.last = ""  # the connection's last response id
        self.flight: asyncio.Task[None] | None = None
        self.flight_id = ""
        self.send_lock = asyncio.Lock()

    async def send(self, payload: Any) -> None:
        async with self.send_lock:
            await asyncio.wait_for(
                self.websocket.send_text(orjson.dumps(payload).decode()), self.ctx.send_timeout
            )

    async def error(self, exc: TokenwireError, lane: Any = None) -> None:
        frame: dict[str, Any] = {
            "type": "error",
            "status": exc.status_code,
            "error": {
                "type": exc.error_type,
                "code": exc.code,
                "message": exc.message,
                "param": exc.param,
            },
        }
        if lane is not None:
            frame["stream_id"] = lane
        await self.send(frame)

    async def run(self) -> None:
        while True:
            try:
                raw = await self.websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError, KeyError):
                return
            try:
                frame = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await self.error(InvalidRequest("A frame must be a JSON object."))
                continue
            if not isinstance(frame, dict) or frame.get("type") != "response.create":
                kind = frame.get("type") if isinstance(frame, dict) else None
                await self.error(
                    InvalidRequest(f"Unsupported event type {kind!r}: send response.create.")
                )
                continue
            lane = frame.get("stream_id")
            if self.flight is not None and not self.flight.done():
                await self.error(
                    InvalidRequest(
                        "A response is already in progress on this connection: wait for its "
                        "terminal event (one response in flight per connection)."
                    ),
                    lane,
                )
                continue
            body = {k: v for k, v in frame.items() if k not in ("type", "stream_id", "stream")}
            if body.get("generate", True) is False:
                await self.error(
                    InvalidRequest("generate: false is not supported.", param="generate"), lane
                )
                continue
            body.pop("generate", None)
            if body.get("background"):
                await self.error(
                    InvalidRequest(
                        "background is not supported over WebSocket.", param="background"
                    ),
                    lane,
                )
                continue
            try:
                _, meta = await self.protocol._start(self.ctx, self.websocket, body, last=self.last)
            except TokenwireError as exc:
                await self.error(exc, lane)
                continue
            self.last = self.flight_id = self.protocol.public_id(meta.id)
            self.flight = asyncio.create_task(self._relay(meta, lane))

    async def _relay(self, meta: StreamMeta, lane: Any) -> None:
        renderer = self.protocol.renderer(meta)
        try:
            async for event in self.ctx.read(meta.id):
                for payload in renderer.render(event):
                    if lane is not None:
                        payload = {**payload, "stream_id": lane}  # type: ignore[dict-item]
                    await self.send(payload)
        except TokenwireError as exc:
            await self.error(exc, lane)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            # A client that stopped reading (send timeout) or left: end the connection,
            # and with it this response (``close``).
            with contextlib.suppress(Exception):
                await self.websocket.close(code=1011)

    async def close(self) -> None:
        """The connection is gone: a response still in flight stops (a foreground one)."""
        flight = self.flight
        if flight is None or flight.done():
            if flight is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    flight.result()
            return
        flight.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await flight
        with contextlib.suppress(TokenwireError):
            await self.ctx.cancel(self.protocol.stream_id(self.flight_id), "disconnect")


PROTOCOL = OpenAIResponses()
