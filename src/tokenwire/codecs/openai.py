"""The OpenAI chat-completions wire, spoken to a server: the request body, and the decoder
of its streamed chunks (used by the upstream backend and the Python client alike).

Decoding: each chunk becomes events as it arrives: ``delta.content`` -> ``TextDelta``;
``delta.tool_calls`` -> ``ToolCallStarted`` (once id and name are known) and
``ToolCallDelta``, then ``ToolCallCompleted`` with the arguments as they are when the call
is complete (the next call starts, or ``finish_reason`` arrives; validation is the
structured-output stage's job); the usage chunk -> ``Usage`` (held until the end, where
tokenwire's order puts it); ``[DONE]`` -> ``StreamCompleted`` with the finish reason in
tokenwire's vocabulary. An ``{"error": …}`` chunk raises ``WireError``; a malformed one
``BackendProtocolError``. A body that ends after ``finish_reason`` but without ``[DONE]``
is complete (some servers end there); one that ends before it is cut short.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from tokenwire.codecs.base import ClientWire, WireDecoder, WireError, load_object
from tokenwire.errors import BackendProtocolError, BackendUnavailable
from tokenwire.events import (
    Event,
    StreamCompleted,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)
from tokenwire.requests import ChatRequest

__all__ = [
    "CLIENT",
    "FINISH_REASONS",
    "PATH",
    "ChatDecoder",
    "auth_headers",
    "chat_body",
    "client_body",
]

#: Where a stream starts, under a base URL ending in ``/v1``.
PATH = "/chat/completions"

#: The wire's finish reasons -> tokenwire's.
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "eos": "stop",  # TGI
}


def auth_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def chat_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The chat-completions body for ``request`` (streaming, usage requested)."""
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(message) for message in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    optional = {
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "stop": sampling.stop or None,
        "presence_penalty": sampling.presence_penalty or None,
        "frequency_penalty": sampling.frequency_penalty or None,
        "tool_choice": request.tool_choice,
        "user": request.extra.get("user") or None,
    }
    body.update((key, value) for key, value in optional.items() if value is not None)
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters or {"type": "object", "properties": {}},
                },
            }
            for tool in request.tools
        ]
    fmt = request.response_format
    if fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.name or "response",
                "schema": fmt.schema or {},
                "strict": fmt.strict,
            },
        }
    return body


def _message(message: Any) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        wire["name"] = message.name
    if message.tool_calls:
        wire["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
        if not message.content:
            wire["content"] = None
    if message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    return wire


class _Call:
    __slots__ = ("arguments", "completed", "id", "name", "started")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []
        self.started = False
        self.completed = False


class ChatDecoder(WireDecoder):
    """Chat-completion chunks -> events, for one response (see the module docstring)."""

    def __init__(self) -> None:
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._calls: dict[int, _Call] = {}

    def decode(self, event: str, data: bytes) -> list[Event]:
        if data == b"[DONE]":
            self.done = True
            return self._close()
        chunk = load_object(data)
        if "error" in chunk:
            raise WireError.of(chunk["error"])
        if self.started is None:
            self.started = StreamStarted(
                id=str(chunk.get("id", "")),
                model=str(chunk.get("model", "")),
                created=int(chunk.get("created") or time.time()),
            )
        choices = chunk.get("choices")
        if choices:
            events = self._choice(choices[0], data)
        elif choices is None and "usage" not in chunk:
            raise BackendProtocolError(f"malformed stream chunk (no choices): {data[:200]!r}")
        else:
            events = []
        usage = chunk.get("usage")
        if usage:
            try:
                self._usage = Usage(
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
            except (AttributeError, TypeError, ValueError) as exc:
                raise BackendProtocolError(f"malformed stream usage: {usage!r}") from exc
        return events

    def _choice(self, choice: Any, data: bytes) -> list[Event]:
        if not isinstance(choice, dict):
            raise BackendProtocolError(f"malformed stream chunk: {data[:200]!r}")
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise BackendProtocolError(f"malformed stream chunk: {data[:200]!r}")
        content = delta.get("content")
        events: list[Event]
        if content:
            if not isinstance(content, str):
                raise BackendProtocolError(f"malformed stream content: {data[:200]!r}")
            events = [TextDelta(text=content)]
        else:
            events = []
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            events += self._tool_deltas(tool_calls, data)
        finish = choice.get("finish_reason")
        if finish:
            self._finish = FINISH_REASONS.get(str(finish), "stop")
            events += self._complete_calls()
        return events

    def _tool_deltas(self, tool_calls: Any, data: bytes) -> list[Event]:
        events: list[Event] = []
        if not isinstance(tool_calls, list):
            raise BackendProtocolError(f"malformed stream tool_calls: {data[:200]!r}")
        for raw in tool_calls:
            if not isinstance(raw, dict):
                raise BackendProtocolError(f"malformed stream tool call: {data[:200]!r}")
            index = int(raw.get("index", 0))
            call = self._calls.get(index)
            if call is None:
                # A new call: the ones before it are complete.
                events += self._complete_calls(before=index)
                call = self._calls[index] = _Call()
            function = raw.get("function") or {}
            if raw.get("id"):
                call.id = str(raw["id"])
            if function.get("name"):
                call.name += str(function["name"])
            arguments = function.get("arguments")
            if not call.started and call.name:
                call.started = True
                call.id = call.id or f"call_{secrets.token_hex(12)}"
                events.append(ToolCallStarted(index=index, id=call.id, name=call.name))
                # Arguments that arrived before the name (rare) go out now.
                if call.arguments:
                    events.append(
                        ToolCallDelta(index=index, arguments_delta="".join(call.arguments))
                    )
            if arguments:
                call.arguments.append(str(arguments))
                if call.started:
                    events.append(ToolCallDelta(index=index, arguments_delta=str(arguments)))
        return events

    def _complete_calls(self, before: int | None = None) -> list[Event]:
        events: list[Event] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if call.completed or (before is not None and index >= before):
                continue
            call.completed = True
            if not call.started:
                raise BackendProtocolError(f"stream tool call {index} has no name")
            events.append(
                ToolCallCompleted(
                    index=index, id=call.id, name=call.name, arguments="".join(call.arguments)
                )
            )
        return events

    def _close(self) -> list[Event]:
        events = self._complete_calls()
        if self._usage is not None:
            events.append(self._usage)
        finish = self._finish or ("tool_calls" if self._calls else "stop")
        events.append(StreamCompleted(finish_reason=finish))
        return events

    def finish(self) -> list[Event]:
        if self.done:
            return []
        if self._finish is None:
            raise BackendUnavailable(
                "the upstream closed the stream before finishing the answer",
                code="upstream_disconnected",
            )
        # finish_reason arrived but no [DONE]: some servers end the body there.
        self.done = True
        return self._close()


def client_body(
    model: str, messages: list[dict[str, Any]], params: dict[str, Any]
) -> dict[str, Any]:
    """A client's chat-shaped arguments, as they are, streaming with usage."""
    body = {"model": model, "messages": messages, **params, "stream": True}
    body.setdefault("stream_options", {"include_usage": True})
    return body


CLIENT = ClientWire(
    path="/v1" + PATH, request_body=client_body, auth_headers=auth_headers, decoder=ChatDecoder
)
