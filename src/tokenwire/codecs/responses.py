"""The OpenAI Responses wire, spoken to a server: the request body, and the decoder of its
streamed events (the Python client's ``protocol="responses"``).

Decoding: ``response.created`` says what the response is (``started``);
``response.output_text.delta`` -> ``TextDelta``; a ``function_call`` output item ->
``ToolCallStarted`` when added, ``ToolCallDelta`` per ``function_call_arguments.delta``,
``ToolCallCompleted`` when the item is done (with its whole arguments);
``response.completed`` / ``response.incomplete`` -> ``Usage`` and ``StreamCompleted``
(``tool_calls`` when the answer called a function; ``length`` for ``max_output_tokens``,
``content_filter``); ``response.cancelled`` (tokenwire's, see docs/responses.md) ->
``StreamCancelled``; ``response.failed`` raises ``WireError`` with the response's error (or
the flat ``error`` event before it). Other event types (reasoning, built-in tools, newer
ones) carry nothing tokenwire's events say, and are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from tokenwire.codecs import openai
from tokenwire.codecs.base import ClientWire, WireDecoder, WireError, load_object
from tokenwire.errors import BackendProtocolError, BackendUnavailable
from tokenwire.events import (
    Event,
    StreamCancelled,
    StreamCompleted,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)

__all__ = ["CLIENT", "PATH", "ResponsesDecoder", "request_body"]

#: Where a response starts, under a base URL ending in ``/v1``.
PATH = "/responses"

_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def _tool(tool: Any) -> Any:
    """A chat-completions tool (``{"type": "function", "function": {…}}``) made flat."""
    if isinstance(tool, Mapping) and tool.get("type") == "function" and "function" in tool:
        return {"type": "function", **tool["function"]}
    return tool


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, Mapping) and choice.get("type") == "function" and "function" in choice:
        return {"type": "function", "name": choice["function"]["name"]}
    return choice


def _input(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id", ""),
                    "output": str(message.get("content") or ""),
                }
            )
            continue
        content = message.get("content")
        if content:
            items.append({"role": role, "content": content})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("id", ""),
                    "name": function.get("name", ""),
                    "arguments": function.get("arguments", ""),
                }
            )
    return items


def request_body(
    model: str, messages: list[dict[str, Any]], params: dict[str, Any]
) -> dict[str, Any]:
    """Chat-shaped arguments (what every client protocol takes) as a Responses body: system
    messages become ``instructions``, the rest ``input`` items; ``max_tokens`` is
    ``max_output_tokens``; chat-style tools, tool choice and ``response_format`` are mapped."""
    params = dict(params)
    system = [str(m.get("content") or "") for m in messages if m.get("role") == "system"]
    body: dict[str, Any] = {
        "model": model,
        "input": _input([m for m in messages if m.get("role") != "system"]),
    }
    if system:
        body["instructions"] = "\n\n".join(system)
    for chat_name in ("max_tokens", "max_completion_tokens"):
        if chat_name in params:
            body["max_output_tokens"] = params.pop(chat_name)
    if params.get("tools"):
        params["tools"] = [_tool(tool) for tool in params["tools"]]
    if "tool_choice" in params:
        params["tool_choice"] = _tool_choice(params["tool_choice"])
    response_format = params.pop("response_format", None)
    if isinstance(response_format, Mapping):
        fmt = dict(response_format)
        schema = fmt.pop("json_schema", None)
        if isinstance(schema, Mapping):
            fmt.update(schema)
        body["text"] = {"format": fmt}
    params.pop("stream_options", None)
    body.update(params)
    body["stream"] = True
    return body


def _started(response: dict[str, Any]) -> StreamStarted:
    """The stream's start, from the first Response object (created, in_progress or queued)."""
    return StreamStarted(
        id=str(response.get("id", "")),
        model=str(response.get("model", "")),
        created=int(response.get("created_at") or time.time()),
    )


class ResponsesDecoder(WireDecoder):
    """Responses API events -> tokenwire events, for one response."""

    def __init__(self) -> None:
        self._calls: dict[str, tuple[int, str, str]] = {}  # item id -> index, call id, name
        self._called = False
        self._error: dict[str, Any] | None = None

    def decode(self, event: str, data: bytes) -> list[Event]:
        message = load_object(data)
        kind = message.get("type") or event
        try:
            return self._decode(str(kind), message)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BackendProtocolError(f"malformed Responses event: {data[:200]!r}") from exc

    def _decode(self, kind: str, message: dict[str, Any]) -> list[Event]:
        if kind == "response.output_text.delta":
            delta = message["delta"]
            return [TextDelta(text=str(delta))] if delta else []
        if kind == "response.function_call_arguments.delta":
            call = self._calls.get(str(message.get("item_id")))
            delta = str(message.get("delta") or "")
            if call is None or not delta:
                return []
            return [ToolCallDelta(index=call[0], arguments_delta=delta)]
        if kind == "response.output_item.added":
            return self._item_added(message["item"])
        if kind == "response.output_item.done":
            return self._item_done(message["item"])
        if kind in ("response.created", "response.in_progress", "response.queued"):
            if self.started is None:
                self.started = _started(message["response"])
            return []
        if kind in ("response.completed", "response.incomplete"):
            self.done = True
            return self._ended(kind, message["response"])
        if kind == "response.cancelled":
            self.done = True
            return [StreamCancelled(reason="stop")]
        if kind == "error":
            self._error = {k: v for k, v in message.items() if k != "sequence_number"}
            return []
        if kind == "response.failed":
            self.done = True
            error = (message.get("response") or {}).get("error") or self._error
            raise WireError.of(error or {"message": "the response failed"})
        return []

    def _item_added(self, item: dict[str, Any]) -> list[Event]:
        """A function call item opens: its index, call id and name."""
        if item.get("type") != "function_call":
            return []
        index = len(self._calls)
        call = (index, str(item["call_id"]), str(item["name"]))
        self._calls[str(item.get("id") or item["call_id"])] = call
        self._called = True
        return [ToolCallStarted(index=index, id=call[1], name=call[2])]

    def _item_done(self, item: dict[str, Any]) -> list[Event]:
        """A function call item closes: its whole arguments, unless it was cut short."""
        call = self._calls.get(str(item.get("id") or item.get("call_id")))
        if item.get("type") != "function_call" or call is None:
            return []
        if item.get("status", "completed") != "completed":
            return []  # cut short: its arguments are not whole
        return [
            ToolCallCompleted(
                index=call[0], id=call[1], name=call[2], arguments=str(item["arguments"])
            )
        ]

    def _ended(self, kind: str, response: dict[str, Any]) -> list[Event]:
        """``response.completed`` or ``.incomplete``: its usage, then the terminal event."""
        events: list[Event] = []
        usage = response.get("usage")
        if usage:
            details = usage.get("input_tokens_details") or {}
            events.append(
                Usage(
                    prompt_tokens=int(usage.get("input_tokens") or 0),
                    completion_tokens=int(usage.get("output_tokens") or 0),
                    cached_tokens=details.get("cached_tokens"),
                )
            )
        if kind == "response.incomplete":
            reason = (response.get("incomplete_details") or {}).get("reason")
            finish = _INCOMPLETE.get(str(reason), "length")
        else:
            finish = "tool_calls" if self._called else "stop"
        events.append(StreamCompleted(finish_reason=finish))
        return events

    def finish(self) -> list[Event]:
        if self.done:
            return []
        raise BackendUnavailable("the response ended before its terminal event")


CLIENT = ClientWire(
    path="/v1" + PATH,
    request_body=request_body,
    auth_headers=openai.auth_headers,
    decoder=ResponsesDecoder,
)
