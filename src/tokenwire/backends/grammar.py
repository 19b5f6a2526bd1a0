"""Constrained decoding for the embedded model: JSON response formats and tool calls.

``gbnf_for(request)`` turns a request into a GBNF grammar for llama.cpp:

- ``response_format`` ``json_schema``: the schema, through llama-cpp-python's
  ``json_schema_to_gbnf`` (so the output always parses and validates, within max_tokens;
  integer ``minimum``/``maximum`` are enforced for ranges up to 512 values, wider numeric
  bounds and ``format``s are left to the validating stage);
- ``json_object``: any JSON object;
- ``tools`` (unless ``tool_choice`` is ``"none"``): one call as
  ``{"name": "<tool>", "arguments": {…schema of that tool…}}``. With ``tool_choice``
  ``"auto"`` the model may instead answer in text: the grammar then allows any text that
  does not start with ``{``, so the first character decides. ``"required"`` or a named
  function force a call.

``tool_call_events`` turns the constrained text of a call back into ``tool_call.started`` /
``tool_call.delta`` events (the arguments stream as they are decoded) and finishes with
``finish_reason`` ``tool_calls``; ``stages/tools.py`` then validates and completes the call.
``prompt_messages`` renders tool definitions, assistant tool calls and tool results into the
plain role/content messages a chat template takes.

This module is the whole of the embedded backend's structured-output logic, so the decode
loop only passes ``grammar=`` to llama.cpp and wraps its events.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from tokenwire.errors import InvalidRequest
from tokenwire.events import (
    Event,
    StreamCompleted,
    TextDelta,
    ToolCallDelta,
    ToolCallStarted,
    aclose,
)
from tokenwire.jsonstream import JsonStreamError, PartialJsonParser
from tokenwire.requests import ChatRequest, Tool

__all__ = [
    "forced_tool",
    "gbnf_for",
    "json_schema_gbnf",
    "llama_grammar",
    "new_call_id",
    "prompt_messages",
    "tool_call_events",
    "tool_mode",
]

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# json_schema_to_gbnf lets raw control characters into strings, which is not JSON.
_CHAR_RULE = re.compile(r"^char ::= \[\^\"\\\\\]", re.MULTILINE)
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F]'
#: Integer ranges up to this size are constrained exactly (as an enum of their values).
_MAX_ENUM_RANGE = 512
#: Free text for tool_choice "auto": anything whose first character is not "{".
_TEXT_RULES = "text ::= [^{] text-rest\ntext-rest ::= [^\\x00]*\n"


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18)


def tool_mode(request: ChatRequest) -> str:
    """``none`` (no tools offered), ``auto`` or ``required`` (a call is forced)."""
    if not request.tools:
        return "none"
    choice = request.tool_choice
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return "none"
    return "required"  # "required", or {"type": "function", "function": {"name": …}}


def forced_tool(request: ChatRequest) -> str | None:
    choice = request.tool_choice
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not any(t.name == name for t in request.tools):
            raise InvalidRequest(
                f"tool_choice names a function that is not in tools: {name!r}",
                param="tool_choice",
            )
        return name
    return None


@functools.lru_cache(maxsize=256)
def _schema_gbnf(schema_json: str, prop_order: tuple[str, ...]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf: str = json_schema_to_gbnf(schema_json, prop_order=list(prop_order))
    return _CHAR_RULE.sub(lambda _: _STRICT_CHAR, gbnf)


def _bounded_integers(node: Any) -> Any:
    """Small integer ranges as enums: the converter ignores minimum/maximum."""
    if isinstance(node, list):
        return [_bounded_integers(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _bounded_integers(value) for key, value in node.items()}
    low, high = out.get("minimum"), out.get("maximum")
    if isinstance(out.get("exclusiveMinimum"), int) and not isinstance(low, int):
        low = out["exclusiveMinimum"] + 1
    if isinstance(out.get("exclusiveMaximum"), int) and not isinstance(high, int):
        high = out["exclusiveMaximum"] - 1
    if (
        out.get("type") == "integer"
        and isinstance(low, int)
        and isinstance(high, int)
        and 0 <= high - low <= _MAX_ENUM_RANGE
        and "enum" not in out
    ):
        for key in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            out.pop(key, None)
        out["enum"] = list(range(low, high + 1))
    return out


def json_schema_gbnf(
    schema: dict[str, Any], *, param: str, prop_order: tuple[str, ...] = ()
) -> str:
    try:
        return _schema_gbnf(json.dumps(_bounded_integers(schema)), prop_order)
    except Exception as exc:  # the converter raises plain errors on schemas it cannot do
        raise InvalidRequest(
            f"The embedded model cannot constrain output to this JSON schema: {exc}",
            param=param,
        ) from exc


def _tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    "arguments": tool.parameters or _ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in tools
        ]
    }


def gbnf_for(request: ChatRequest) -> str | None:
    """The grammar that constrains this request's output, or None for free text.

    Raises ``InvalidRequest`` (a 400 before any output) for a schema it cannot compile.
    """
    mode = tool_mode(request)
    if mode != "none":
        name = forced_tool(request)
        tools = [t for t in request.tools if name is None or t.name == name]
        call = json_schema_gbnf(
            _tool_call_schema(tools), param="tools", prop_order=("name", "arguments")
        )
        if mode == "required":
            return call
        # Rename the call grammar's root and offer free text beside it.
        call = re.sub(r"^root ::=", "call ::=", call, flags=re.MULTILINE)
        return f"root ::= call | text\n{call}\n{_TEXT_RULES}"
    fmt = request.response_format
    if fmt.type == "json_schema" and fmt.schema is not None:
        return json_schema_gbnf(fmt.schema, param="response_format.json_schema.schema")
    if fmt.type in ("json_object", "json_schema"):
        return json_schema_gbnf(_ANY_OBJECT, param="response_format")
    return None


@functools.lru_cache(maxsize=64)
def _compiled(gbnf: str) -> Any:
    from llama_cpp.llama_grammar import LlamaGrammar

    return LlamaGrammar.from_string(gbnf, verbose=False)


def llama_grammar(request: ChatRequest) -> Any:
    """``gbnf_for`` as a ``llama_cpp.LlamaGrammar`` (None for free text), for ``generate``."""
    gbnf = gbnf_for(request)
    return None if gbnf is None else _compiled(gbnf)


# -- prompt ----------------------------------------------------------------------------------


def _tools_prompt(request: ChatRequest) -> str:
    lines = ["You can call these tools:"]
    for tool in request.tools:
        params = json.dumps(tool.parameters or _ANY_OBJECT, separators=(",", ":"))
        lines.append(f"- {tool.name}: {tool.description or 'no description'} Arguments: {params}")
    lines.append(
        'To call a tool, answer only with JSON: {"name": "<tool name>", "arguments": {...}}. '
        "A tool's result comes back in a tool message; then answer the user in plain text."
    )
    return "\n".join(lines)


def prompt_messages(request: ChatRequest) -> list[dict[str, str]]:
    """Role/content messages for a chat template, with tools and tool calls rendered in."""
    messages: list[dict[str, str]] = []
    for message in request.messages:
        content = message.content
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                try:
                    arguments: Any = json.loads(call.arguments or "{}")
                except ValueError:
                    arguments = call.arguments
                calls.append(json.dumps({"name": call.name, "arguments": arguments}))
            content = "\n".join([content, *calls]) if content else "\n".join(calls)
        messages.append({"role": message.role, "content": content})
    if tool_mode(request) != "none":
        prompt = _tools_prompt(request)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


# -- events ----------------------------------------------------------------------------------


class _CallWatcher:
    """Listener over ``{"name": …, "arguments": …}``: finds the name and the arguments span."""

    def __init__(self) -> None:
        self.depth = 0
        self.name: str | None = None
        self.capturing = False
        self.ended_now = False
        self.arguments_done = False

    def begin(self, kind: str, key: str | int | None) -> None:
        self.depth += 1
        if self.depth == 2 and key == "arguments":
            self.capturing = True

    def key(self, name: str) -> None:
        pass

    def chunk(self, text: str) -> None:
        pass

    def end(self, value: Any) -> None:
        if self.depth == 2:
            if self.capturing:
                self.capturing = False
                self.ended_now = True
                self.arguments_done = True
            elif isinstance(value, str) and self.name is None:
                self.name = value
        self.depth -= 1


async def tool_call_events(
    events: AsyncIterator[Event], request: ChatRequest
) -> AsyncGenerator[Event, None]:
    """Turn the text of a grammar-constrained call into tool-call events (see module doc).

    Closes ``events`` when it is closed itself, so decoding stops with the consumer.
    """
    if tool_mode(request) == "none":
        try:
            async for event in events:
                yield event
        finally:
            await aclose(events)
        return
    watcher = _CallWatcher()
    parser = PartialJsonParser(watcher)
    decided: bool | None = None  # None: undecided; True: a call; False: text
    call_id = new_call_id()
    try:
        async for event in events:
            if isinstance(event, TextDelta) and decided is not False:
                arguments: list[str] = []
                text = event.text
                if decided is None:
                    if not text:
                        continue
                    # The grammar's call branch starts with "{" and its text branch cannot,
                    # so the very first character decides.
                    decided = text.startswith("{")
                    if not decided:
                        yield event
                        continue
                for char in text:
                    try:
                        parser.feed(char)
                    except JsonStreamError:
                        break  # the grammar prevents this; the tools stage reports what came
                    if watcher.capturing or watcher.ended_now:
                        arguments.append(char)
                        watcher.ended_now = False
                    if watcher.name is not None and call_id:
                        yield ToolCallStarted(index=0, id=call_id, name=watcher.name)
                        call_id = ""
                if arguments:
                    yield ToolCallDelta(index=0, arguments_delta="".join(arguments))
            elif isinstance(event, StreamCompleted) and decided:
                reason = "tool_calls" if watcher.arguments_done else event.finish_reason
                yield StreamCompleted(finish_reason=reason)
            else:
                yield event
    finally:
        await aclose(events)
