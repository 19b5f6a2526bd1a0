"""The Responses API's create body: its checks, and its translation into a ``ChatRequest``.

``parse_body`` checks what needs no journal; ``build`` turns a checked body (and the
conversation of a ``previous_response_id``) into a ``Parsed`` whose ``render`` keeps what the
renderer echoes: the request's fields, its input items and the conversation before it.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tokenwire.errors import InvalidRequest
from tokenwire.protocols.base import Parsed
from tokenwire.protocols.conversation import message_dict
from tokenwire.requests import (
    ChatRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolCall,
)

__all__ = [
    "ResponseCreateBody",
    "build",
    "check",
    "items_to_messages",
    "parse_body",
]

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


def check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequest(message, param=param)


def _text_of(content: Any, param: str, allowed: tuple[str, ...]) -> str:
    """The text of a message's ``content``: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    check(isinstance(content, list), "content must be a string or a list of parts.", param)
    texts: list[str] = []
    for index, part in enumerate(content):
        where = f"{param}.{index}"
        check(isinstance(part, dict), "a content part must be an object.", where)
        kind = part.get("type")
        if kind not in allowed:
            raise InvalidRequest(
                f"content parts of type {kind!r} are not supported here (text only: "
                f"{', '.join(allowed)}).",
                param=f"{where}.type",
            )
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        check(isinstance(text, str), f"a {kind} part needs its text.", where)
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
    check(isinstance(raw, list), "input must be a string or a list of items.", "input")
    check(bool(raw), "input must not be empty.", "input")
    items: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        where = f"input.{index}"
        check(isinstance(item, dict), "an input item must be an object.", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            check(
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
                check(
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
            check(
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


def items_to_messages(items: list[dict[str, Any]], out: list[Message]) -> None:
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


def _tools(raw: Any) -> tuple[list[Tool], list[dict[str, Any]]]:
    if raw is None:
        return [], []
    check(isinstance(raw, list), "tools must be a list.", "tools")
    tools: list[Tool] = []
    echo: list[dict[str, Any]] = []
    for index, tool in enumerate(raw):
        where = f"tools.{index}"
        check(isinstance(tool, dict), "a tool must be an object.", where)
        if tool.get("type") != "function":
            raise InvalidRequest(
                f"tools of type {tool.get('type')!r} are not supported here: only function "
                "tools (the backends run no built-in tools).",
                param=f"{where}.type",
            )
        name = tool.get("name")
        check(
            isinstance(name, str) and 0 < len(name) <= 64,
            "a function tool needs a name (1-64 characters).",
            f"{where}.name",
        )
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        check(isinstance(parameters, dict), "parameters must be a JSON Schema.", where)
        description = tool.get("description") or ""
        check(isinstance(description, str), "description must be a string.", where)
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
        check(
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
    check(isinstance(raw, dict), "text must be an object.", "text")
    for key in raw:
        if key not in ("format", "verbosity"):
            raise InvalidRequest(f"text.{key} is not supported.", param=f"text.{key}")
    fmt = raw.get("format") or {"type": "text"}
    check(isinstance(fmt, dict), "text.format must be an object.", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return ResponseFormat(), {"format": {"type": "text"}}
    if kind == "json_object":
        return ResponseFormat(type="json_object"), {"format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = fmt.get("schema")
        check(isinstance(schema, dict), "text.format.schema must be an object.", "text.format")
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
    check(
        isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high,
        f"{name} must be a number from {low:g} to {high:g}.",
        name,
    )
    return float(value)


def parse_body(body: Any) -> dict[str, Any]:
    """Check a create body's fields (the parts that need no journal); return it."""
    check(isinstance(body, dict), "The request body must be a JSON object.", "body")
    for key in body:
        if key not in _FIELDS:
            raise InvalidRequest(f"Unsupported parameter: '{key}'.", param=str(key))
    check(
        isinstance(body.get("model"), str) and bool(body["model"]),
        "model is required (a string).",
        "model",
    )
    check("input" in body, "input is required.", "input")
    for name in ("stream", "store", "background", "parallel_tool_calls"):
        value = body.get(name)
        check(value is None or isinstance(value, bool), f"{name} must be a boolean.", name)
    if body.get("background") and body.get("store") is False:
        raise InvalidRequest("background mode requires store: true.", param="background")
    instructions = body.get("instructions")
    check(
        instructions is None or isinstance(instructions, str),
        "instructions must be a string.",
        "instructions",
    )
    max_output = body.get("max_output_tokens")
    check(
        max_output is None
        or (isinstance(max_output, int) and not isinstance(max_output, bool) and max_output >= 1),
        "max_output_tokens must be an integer >= 1.",
        "max_output_tokens",
    )
    user = body.get("user")
    check(user is None or isinstance(user, str), "user must be a string.", "user")
    seed = body.get("seed")
    check(
        seed is None or (isinstance(seed, int) and not isinstance(seed, bool)),
        "seed must be an integer.",
        "seed",
    )
    metadata = body.get("metadata")
    check(
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
    check(
        previous is None or isinstance(previous, str),
        "previous_response_id must be a string.",
        "previous_response_id",
    )
    # Fields accepted only where they ask for what tokenwire does anyway.
    check(
        not body.get("include"),
        "include is not supported (no logprobs, no tools' extra output).",
        "include",
    )
    check(
        body.get("truncation") in (None, "disabled"),
        "truncation 'auto' is not supported: a prompt that does not fit is a 400.",
        "truncation",
    )
    check(
        body.get("service_tier") in (None, "auto", "default"),
        "service_tier: only auto or default.",
        "service_tier",
    )
    reasoning = body.get("reasoning")
    check(
        not reasoning or (isinstance(reasoning, dict) and not any(reasoning.values())),
        "reasoning is not supported by these models.",
        "reasoning",
    )
    check(not body.get("top_logprobs"), "top_logprobs is not supported.", "top_logprobs")
    options = body.get("stream_options")
    check(
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
    items_to_messages(items, messages)
    if all(not m.content.strip() and not m.tool_calls for m in messages):
        raise InvalidRequest("input must contain some content.", param="input")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    check(top_p is None or top_p > 0, "top_p must be greater than 0.", "top_p")
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
            "context": [message_dict(m) for m in prior],
        },
    )


#: Id prefixes of items, by type.
_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
