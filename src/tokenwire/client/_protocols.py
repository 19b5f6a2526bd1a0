"""Wire protocols the client speaks, each mapped into the same ``tokenwire.events``.

- ``native``: tokenwire's ``POST /v1/streams``; the events arrive as they are.
- ``openai``: ``POST /v1/chat/completions`` with ``stream: true`` on any OpenAI-compatible
  server (tokenwire, vLLM, llama.cpp, OpenAI …); chunks become events.
- ``anthropic``: ``POST /v1/messages`` on any Anthropic Messages server; its event types
  (``message_start``, ``content_block_delta`` …) become events.

A mapper is stateful for one stream and knows nothing of sockets: it turns one decoded SSE
event into zero or more tokenwire events. Events of a mapped protocol get the SSE ``id`` as
``seq`` when the server sends numeric ids (tokenwire does, for every protocol), else a
running count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import orjson

from tokenwire.client._sse import ServerSentEvent
from tokenwire.events import (
    Event,
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
    Usage,
)

__all__ = [
    "AnthropicMapper",
    "Mapper",
    "NativeMapper",
    "OpenAIMapper",
    "ProtocolName",
    "build_request",
    "mapper_for",
    "to_wire_messages",
]

ProtocolName = Literal["native", "openai", "anthropic"]

_KNOWN: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        StreamStarted,
        Progress,
        TextDelta,
        ToolCallStarted,
        ToolCallDelta,
        ToolCallCompleted,
        JsonPartial,
        Usage,
        StreamCompleted,
        StreamCancelled,
        StreamFailed,
    )
}


def to_wire_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Dicts pass through; ``tokenwire.Message`` (or any dataclass) becomes a dict."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, Mapping):
            out.append(dict(message))
        elif dataclasses.is_dataclass(message) and not isinstance(message, type):
            data = {"role": message.role, "content": message.content}  # type: ignore[attr-defined]
            out.append(data)
        else:
            raise TypeError(f"a message must be a dict or tokenwire.Message, not {message!r}")
    return out


def build_request(
    protocol: ProtocolName, model: str, messages: list[dict[str, Any]], params: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``(path, json body)`` that starts a stream in ``protocol``."""
    mapper = _mapper_class(protocol)
    return mapper.path, mapper.request_body(model, messages, params)


def _anthropic_tool(tool: Any) -> Any:
    """OpenAI's ``{"type": "function", "function": {…}}`` in Anthropic's shape; others as is,
    so one ``tools=`` list works with every protocol."""
    if isinstance(tool, Mapping) and tool.get("type") == "function" and "function" in tool:
        function = tool["function"]
        return {
            "name": function["name"],
            "description": function.get("description", ""),
            "input_schema": function.get("parameters") or {"type": "object"},
        }
    return tool


def _anthropic_tool_choice(choice: Any) -> Any:
    if choice == "required":
        return {"type": "any"}
    if choice in ("auto", "none"):
        return {"type": choice}
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        return {"type": "tool", "name": choice["function"]["name"]}
    return choice


def auth_headers(protocol: ProtocolName, api_key: str | None) -> dict[str, str]:
    return _mapper_class(protocol).headers(api_key)


class Mapper:
    """One wire protocol, client side: how to start a stream, and turning its SSE events
    into tokenwire events."""

    protocol: ProtocolName = "native"
    #: Where a stream of this protocol starts.
    path = "/v1/streams"

    @staticmethod
    def request_body(
        model: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        return {"model": model, "messages": messages, **params}

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        headers = {"accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return headers

    def __init__(self) -> None:
        self._count = -1
        self.stream_id: str | None = None

    def _seq(self, sse: ServerSentEvent) -> int:
        if sse.id.isdigit():
            self._count = int(sse.id)
        else:
            self._count += 1
        return self._count

    def on_event(self, sse: ServerSentEvent) -> list[Event]:
        raise NotImplementedError

    def on_eof(self) -> list[Event]:
        """Events to finish with when the server closed cleanly without a terminal one."""
        return []


class NativeMapper(Mapper):
    protocol: ProtocolName = "native"

    def on_event(self, sse: ServerSentEvent) -> list[Event]:
        data = orjson.loads(sse.data)
        if not isinstance(data, dict):
            return []
        if "error" in data and "type" not in data:
            # An error object in the stream (the OpenAI error shape): treat as failure.
            return [StreamFailed(seq=self._seq(sse), error=dict(data["error"]))]
        cls = _KNOWN.get(str(data.get("type")))
        if cls is None:
            return []  # an event type newer than this client: skip, do not fail
        names = {f.name for f in dataclasses.fields(cls)}
        event = cls(**{k: v for k, v in data.items() if k in names})
        if isinstance(event, StreamStarted):
            self.stream_id = event.id
        return [event]


class OpenAIMapper(Mapper):
    protocol: ProtocolName = "openai"
    path = "/v1/chat/completions"

    @staticmethod
    def request_body(
        model: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"model": model, "messages": messages, **params, "stream": True}
        body.setdefault("stream_options", {"include_usage": True})
        return body

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._finish: str | None = None
        self._tools: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        self._done = False

    def on_event(self, sse: ServerSentEvent) -> list[Event]:
        seq = self._seq(sse)
        if sse.data.strip() == "[DONE]":
            return self._finish_events(seq)
        data = orjson.loads(sse.data)
        if not isinstance(data, dict):
            return []
        if "error" in data:
            error = data["error"] if isinstance(data["error"], dict) else {"message": data["error"]}
            self._done = True
            return [StreamFailed(seq=seq, error=dict(error))]
        out: list[Event] = []
        if not self._started:
            self._started = True
            out.append(
                StreamStarted(
                    seq=seq,
                    id=self.stream_id or str(data.get("id", "")),
                    model=str(data.get("model", "")),
                    created=int(data.get("created") or time.time()),
                )
            )
        for choice in data.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                out.append(TextDelta(seq=seq, text=content))
            for call in delta.get("tool_calls") or []:
                out.extend(self._tool_delta(seq, call))
            if choice.get("finish_reason"):
                self._finish = str(choice["finish_reason"])
        usage = data.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            out.append(
                Usage(
                    seq=seq,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage["completion_tokens"]),
                )
            )
        return out

    def _tool_delta(self, seq: int, call: dict[str, Any]) -> list[Event]:
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        out: list[Event] = []
        if index not in self._tools:
            self._tools[index] = [str(call.get("id") or ""), str(function.get("name") or ""), ""]
            out.append(
                ToolCallStarted(
                    seq=seq, index=index, id=self._tools[index][0], name=self._tools[index][1]
                )
            )
        arguments = function.get("arguments")
        if arguments:
            self._tools[index][2] += arguments
            out.append(ToolCallDelta(seq=seq, index=index, arguments_delta=arguments))
        return out

    def _finish_events(self, seq: int) -> list[Event]:
        if self._done:
            return []
        self._done = True
        out: list[Event] = [
            ToolCallCompleted(seq=seq, index=index, id=tool[0], name=tool[1], arguments=tool[2])
            for index, tool in sorted(self._tools.items())
        ]
        out.append(StreamCompleted(seq=seq, finish_reason=self._finish or "stop"))
        return out

    def on_eof(self) -> list[Event]:
        # Some servers end without [DONE]; a finish_reason already said the answer is whole.
        if self._finish is not None:
            return self._finish_events(self._count)
        return []


@dataclasses.dataclass(slots=True)
class _ToolBlock:
    index: int
    id: str
    name: str
    arguments: str = ""


_ANTHROPIC_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class AnthropicMapper(Mapper):
    protocol: ProtocolName = "anthropic"
    path = "/v1/messages"

    @staticmethod
    def request_body(
        model: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        system = [str(m.get("content", "")) for m in messages if m.get("role") == "system"]
        rest = [m for m in messages if m.get("role") != "system"]
        params = dict(params)
        body = {"model": model, "messages": rest, "max_tokens": params.pop("max_tokens", 1024)}
        if system:
            body["system"] = "\n\n".join(system)
        stop = params.pop("stop", None)
        if stop is not None:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        params.pop("seed", None)  # Anthropic has no seed
        if params.get("tools"):
            params["tools"] = [_anthropic_tool(tool) for tool in params["tools"]]
        if "tool_choice" in params:
            params["tool_choice"] = _anthropic_tool_choice(params["tool_choice"])
        body.update(params)
        body["stream"] = True
        return body

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        headers = {"accept": "text/event-stream", "anthropic-version": "2023-06-01"}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def __init__(self) -> None:
        super().__init__()
        self._input_tokens = 0
        self._output_tokens = 0
        self._stop_reason: str | None = None
        self._blocks: dict[int, _ToolBlock] = {}  # content block index -> tool call
        self._done = False

    def on_event(self, sse: ServerSentEvent) -> list[Event]:
        seq = self._seq(sse)
        data = orjson.loads(sse.data)
        if not isinstance(data, dict):
            return []
        kind = data.get("type") or sse.event
        if kind == "message_start":
            message = data.get("message") or {}
            usage = message.get("usage") or {}
            self._input_tokens = int(usage.get("input_tokens") or 0)
            self._output_tokens = int(usage.get("output_tokens") or 0)
            return [
                StreamStarted(
                    seq=seq,
                    id=self.stream_id or str(message.get("id", "")),
                    model=str(message.get("model", "")),
                    created=int(time.time()),
                )
            ]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                tool_index = len(self._blocks)
                started = _ToolBlock(
                    tool_index, str(block.get("id", "")), str(block.get("name", ""))
                )
                self._blocks[int(data.get("index", 0))] = started
                return [
                    ToolCallStarted(seq=seq, index=tool_index, id=started.id, name=started.name)
                ]
            if block.get("type") == "text" and block.get("text"):
                return [TextDelta(seq=seq, text=str(block["text"]))]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [TextDelta(seq=seq, text=str(delta["text"]))]
            if delta.get("type") == "input_json_delta":
                entry = self._blocks.get(int(data.get("index", 0)))
                partial = str(delta.get("partial_json") or "")
                if entry is None or not partial:
                    return []
                entry.arguments += partial
                return [ToolCallDelta(seq=seq, index=entry.index, arguments_delta=partial)]
            return []  # thinking, signatures: not user-facing text
        if kind == "content_block_stop":
            entry = self._blocks.get(int(data.get("index", 0)))
            if entry is None:
                return []
            return [
                ToolCallCompleted(
                    seq=seq,
                    index=entry.index,
                    id=entry.id,
                    name=entry.name,
                    arguments=entry.arguments or "{}",
                )
            ]
        if kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self._stop_reason = str(delta["stop_reason"])
            usage = data.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self._output_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens") is not None:
                self._input_tokens = int(usage["input_tokens"])
            return []
        if kind == "message_stop":
            return self._finish_events(seq)
        if kind == "error":
            error = data.get("error") or {}
            self._done = True
            return [
                StreamFailed(
                    seq=seq,
                    error={
                        "type": error.get("type", "api_error"),
                        "message": error.get("message", "the stream failed"),
                        "code": None,
                    },
                )
            ]
        return []  # ping, and event types newer than this client

    def _finish_events(self, seq: int) -> list[Event]:
        if self._done:
            return []
        self._done = True
        reason = _ANTHROPIC_REASONS.get(self._stop_reason or "end_turn", self._stop_reason)
        return [
            Usage(seq=seq, prompt_tokens=self._input_tokens, completion_tokens=self._output_tokens),
            StreamCompleted(seq=seq, finish_reason=reason or "stop"),
        ]

    def on_eof(self) -> list[Event]:
        if self._stop_reason is not None:
            return self._finish_events(self._count)
        return []


_MAPPERS: dict[str, type[Mapper]] = {
    "native": NativeMapper,
    "openai": OpenAIMapper,
    "anthropic": AnthropicMapper,
}


def mapper_for(protocol: str) -> Mapper:
    return _mapper_class(protocol)()


def _mapper_class(protocol: str) -> type[Mapper]:
    try:
        return _MAPPERS[protocol]
    except KeyError:
        raise ValueError(
            f"unknown protocol {protocol!r}: use one of {', '.join(sorted(_MAPPERS))}"
        ) from None
