"""Upstream: any OpenAI-compatible chat-completions server (vLLM, TGI, llama.cpp's server,
Ollama, OpenAI, LiteLLM, another tokenwire).

Streams ``POST {url}/chat/completions`` with ``stream_options.include_usage`` and turns each
chunk into events the moment its network read returns: ``delta.content`` -> ``TextDelta``;
``delta.tool_calls`` -> ``ToolCallStarted`` (once id and name are known) and
``ToolCallDelta``, then ``ToolCallCompleted`` with the upstream's arguments as they are when
the call is complete (the next call starts, or ``finish_reason`` arrives; validation is the
structured-output stage's job); the usage chunk -> ``Usage``; ``[DONE]`` ->
``StreamCompleted``. An ``{"error": …}`` chunk or a malformed one is a ``BackendError``,
never a crash. A body that ends without ``finish_reason`` or ``[DONE]`` means the upstream
died mid-answer.
"""

from __future__ import annotations

import secrets
from typing import Any

from tokenwire.backends._upstream import ChunkDecoder, UpstreamBackend, load_json
from tokenwire.errors import BackendProtocolError, BackendUnavailable
from tokenwire.events import (
    Event,
    StreamCompleted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)
from tokenwire.requests import ChatRequest

__all__ = ["OpenAIBackend", "OpenAIDecoder", "chat_body"]

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "eos": "stop",  # TGI
}


def chat_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The chat-completions body for ``request`` (streaming, usage requested)."""
    messages: list[dict[str, Any]] = []
    for message in request.messages:
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
        messages.append(wire)
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    if sampling.max_tokens is not None:
        body["max_tokens"] = sampling.max_tokens
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = sampling.stop
    if sampling.presence_penalty:
        body["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        body["frequency_penalty"] = sampling.frequency_penalty
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
    if request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
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
    if request.extra.get("user"):
        body["user"] = request.extra["user"]
    return body


class _Call:
    __slots__ = ("arguments", "completed", "id", "name", "started")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []
        self.started = False
        self.completed = False


class OpenAIDecoder(ChunkDecoder):
    """Chat-completion chunks -> events, for one response."""

    def __init__(self) -> None:
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._calls: dict[int, _Call] = {}
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def decode(self, event: str, data: bytes) -> list[Event]:
        if data == b"[DONE]":
            self._done = True
            return self._close()
        chunk = load_json(data)
        if not isinstance(chunk, dict):
            raise BackendProtocolError(f"malformed upstream chunk: {data[:200]!r}")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise BackendUnavailable(f"upstream error: {message}", code="upstream_error")
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            if not isinstance(choice, dict):
                raise BackendProtocolError(f"malformed upstream chunk: {data[:200]!r}")
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise BackendProtocolError(f"malformed upstream chunk: {data[:200]!r}")
            content = delta.get("content")
            events: list[Event]
            if content:
                if not isinstance(content, str):
                    raise BackendProtocolError(f"malformed upstream content: {data[:200]!r}")
                events = [TextDelta(text=content)]
            else:
                events = []
            tool_calls = delta.get("tool_calls")
            if tool_calls:
                events += self._tool_deltas(tool_calls, data)
            finish = choice.get("finish_reason")
            if finish:
                self._finish = _FINISH_REASONS.get(str(finish), "stop")
                events += self._complete_calls()
        elif choices is None and "usage" not in chunk:
            raise BackendProtocolError(f"malformed upstream chunk (no choices): {data[:200]!r}")
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
                raise BackendProtocolError(f"malformed upstream usage: {usage!r}") from exc
        return events

    def _tool_deltas(self, tool_calls: Any, data: bytes) -> list[Event]:
        events: list[Event] = []
        if not isinstance(tool_calls, list):
            raise BackendProtocolError(f"malformed upstream tool_calls: {data[:200]!r}")
        for raw in tool_calls:
            if not isinstance(raw, dict):
                raise BackendProtocolError(f"malformed upstream tool call: {data[:200]!r}")
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
                raise BackendProtocolError(f"upstream tool call {index} has no name")
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
        if self._finish is None:
            raise BackendUnavailable(
                "the upstream closed the stream before finishing the answer",
                code="upstream_disconnected",
            )
        # finish_reason arrived but no [DONE]: some servers end the body there.
        self._done = True
        return self._close()


class OpenAIBackend(UpstreamBackend):
    path = "/chat/completions"
    #: Cleared when the upstream refuses ``stream_options`` (older servers): usage is then
    #: passed through only if the upstream sends it unasked.
    send_stream_options = True

    def build_request(self, request: ChatRequest, model: str) -> tuple[str, dict[str, Any]]:
        body = chat_body(request, model)
        if not self.send_stream_options:
            del body["stream_options"]
        return self.base_url + self.path, body

    def retry_body(self, body: dict[str, Any], rejection: str) -> dict[str, Any] | None:
        if "stream_options" in body and "stream_options" in rejection:
            self.send_stream_options = False
            return {key: value for key, value in body.items() if key != "stream_options"}
        return None

    def decoder(self) -> OpenAIDecoder:
        return OpenAIDecoder()
