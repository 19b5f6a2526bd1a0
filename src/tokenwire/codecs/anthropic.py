"""The Anthropic Messages wire, spoken to a server: the request body (and the pieces of it
the Python client builds from OpenAI-shaped arguments), and the decoder of its streamed
events (used by the upstream backend and the Python client alike).

Decoding: ``text_delta`` -> ``TextDelta``; a ``tool_use`` block -> ``ToolCallStarted``, its
``input_json_delta``s -> ``ToolCallDelta``, its ``content_block_stop`` ->
``ToolCallCompleted``; ``message_start`` / ``message_delta`` carry usage and the stop
reason, which come out at ``message_stop`` as ``Usage`` and ``StreamCompleted``. Thinking
and signature deltas are not answer text and are skipped, as are pings and event types
added later. An ``error`` event raises ``WireError``; a body that ends before
``message_stop`` is cut short unless ``message_delta`` already gave the stop reason.

Encoding a neutral request: system messages become the top-level ``system``, tool results
become ``tool_result`` blocks in a user turn, consecutive turns of one role are merged (the
API wants alternation), ``max_tokens`` falls back to a default, and temperature is clamped
to Anthropic's 0..1.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

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
    "PATH",
    "STOP_REASONS",
    "VERSION",
    "MessagesDecoder",
    "auth_headers",
    "client_body",
    "messages_body",
    "tool",
    "tool_choice",
]

#: Where a stream starts, under a base URL ending in ``/v1``.
PATH = "/messages"
#: The ``anthropic-version`` header sent with every request.
VERSION = "2023-06-01"

#: The wire's stop reasons -> tokenwire's finish reasons.
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def auth_headers(key: str | None) -> dict[str, str]:
    headers = {"anthropic-version": VERSION}
    if key:
        headers["x-api-key"] = key
    return headers


def tool(name: str, description: str, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """One tool definition in Anthropic's shape."""
    return {
        "name": name,
        "description": description,
        "input_schema": parameters or {"type": "object", "properties": {}},
    }


def tool_choice(choice: Any) -> Any:
    """An OpenAI-style ``tool_choice`` (``"auto"``, ``"required"``, ``"none"``, or
    ``{"type": "function", "function": {"name": …}}``) in Anthropic's shape; None when it
    names nothing Anthropic knows. Anthropic's own shapes pass through."""
    if isinstance(choice, str):
        mapped = {"auto": "auto", "required": "any", "any": "any", "none": "none"}.get(choice)
        return {"type": mapped} if mapped else None
    if isinstance(choice, Mapping):
        if choice.get("type") in ("auto", "any", "none", "tool"):
            return dict(choice)
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        return {"type": "tool", "name": name} if name else None
    return None


def _tool_input(arguments: str) -> Any:
    try:
        return orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        return {"_raw": arguments}


def _turns(request: ChatRequest) -> tuple[list[str], list[dict[str, Any]]]:
    """The system texts, and the turns with one role each, alternating."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "system":
            system.append(message.content)
            continue
        role = "user" if message.role == "tool" else message.role
        blocks: list[dict[str, Any]] = []
        if message.role == "tool":
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id or "",
                    "content": message.content,
                }
            )
        elif message.content:
            blocks.append({"type": "text", "text": message.content})
        for call in message.tool_calls if message.role != "tool" else ():
            blocks.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": _tool_input(call.arguments),
                }
            )
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def messages_body(request: ChatRequest, model: str, default_max_tokens: int) -> dict[str, Any]:
    """The Messages body that streams ``request`` from ``model``."""
    system, turns = _turns(request)
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": sampling.max_tokens or default_max_tokens,
        "messages": turns,
        "stream": True,
        "temperature": min(max(sampling.temperature, 0.0), 1.0),
    }
    if system:
        body["system"] = "\n\n".join(system)
    if sampling.top_p < 1.0:
        body["top_p"] = sampling.top_p
    if sampling.stop:
        body["stop_sequences"] = sampling.stop
    if request.tools:
        body["tools"] = [tool(t.name, t.description, t.parameters) for t in request.tools]
    choice = tool_choice(request.tool_choice)
    if choice is not None:
        body["tool_choice"] = choice
    if request.extra.get("user"):
        body["metadata"] = {"user_id": str(request.extra["user"])}
    return body


class MessagesDecoder(WireDecoder):
    """Messages stream events -> events, for one response (see the module docstring)."""

    def __init__(self) -> None:
        self._input_tokens = 0
        self._output_tokens = 0
        self._stop: str | None = None
        #: content block index -> (tool index, id, name, argument pieces)
        self._tools: dict[int, tuple[int, str, str, list[str]]] = {}

    def decode(self, event: str, data: bytes) -> list[Event]:
        message = load_object(data)
        kind = message.get("type") or event
        try:
            return self._decode(kind, message)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BackendProtocolError(f"malformed stream {kind} event: {data[:200]!r}") from exc

    def _decode(self, kind: str, message: dict[str, Any]) -> list[Event]:
        if kind == "content_block_delta":
            return self._delta(message)
        if kind == "content_block_start":
            return self._block_start(message)
        if kind == "content_block_stop":
            stopped = self._tools.get(int(message["index"]))
            if stopped is None:
                return []
            arguments = "".join(stopped[3]) or "{}"
            return [
                ToolCallCompleted(
                    index=stopped[0], id=stopped[1], name=stopped[2], arguments=arguments
                )
            ]
        if kind == "message_start":
            self._message_start(message["message"])
            return []
        if kind == "message_delta":
            self._stop = message.get("delta", {}).get("stop_reason") or self._stop
            self._count(message.get("usage") or {})
            return []
        if kind == "message_stop":
            return self._close()
        if kind == "error":
            error = message.get("error") or {}
            error = {"type": "api_error", "message": "the stream failed", "code": None, **error}
            raise WireError(f"upstream error: {error['type']}: {error['message']}", error)
        return []  # ping, and event types added later

    def _delta(self, message: dict[str, Any]) -> list[Event]:
        delta = message["delta"]
        if delta["type"] == "text_delta":
            return [TextDelta(text=delta["text"])] if delta["text"] else []
        if delta["type"] == "input_json_delta":
            tool = self._tools[int(message["index"])]
            piece = delta.get("partial_json") or ""
            if not piece:
                return []
            tool[3].append(piece)
            return [ToolCallDelta(index=tool[0], arguments_delta=piece)]
        return []  # thinking / signature deltas: not part of the answer

    def _block_start(self, message: dict[str, Any]) -> list[Event]:
        block = message["content_block"]
        if block["type"] == "tool_use":
            tool_index = len(self._tools)
            self._tools[int(message["index"])] = (tool_index, block["id"], block["name"], [])
            return [ToolCallStarted(index=tool_index, id=block["id"], name=block["name"])]
        if block["type"] == "text" and block.get("text"):
            return [TextDelta(text=block["text"])]
        return []

    def _message_start(self, started: dict[str, Any]) -> None:
        self._input_tokens = 0
        self._count(started.get("usage") or {})
        self.started = StreamStarted(
            id=str(started.get("id", "")),
            model=str(started.get("model", "")),
            created=int(time.time()),
        )

    def _count(self, usage: dict[str, Any]) -> None:
        if usage.get("input_tokens"):
            self._input_tokens = int(usage["input_tokens"])
        if usage.get("output_tokens") is not None:
            self._output_tokens = int(usage["output_tokens"])

    def finish(self) -> list[Event]:
        if self._stop is None and not self.done:
            raise BackendUnavailable(
                "the upstream closed the stream before message_stop",
                code="upstream_disconnected",
            )
        return self._close()

    def _close(self) -> list[Event]:
        if self.done:
            return []
        self.done = True
        return [
            Usage(prompt_tokens=self._input_tokens, completion_tokens=self._output_tokens),
            StreamCompleted(finish_reason=STOP_REASONS.get(self._stop or "", "stop")),
        ]


def client_body(
    model: str, messages: list[dict[str, Any]], params: dict[str, Any]
) -> dict[str, Any]:
    """A client's chat-shaped arguments in Anthropic's shape: system apart, ``stop`` as
    ``stop_sequences``, OpenAI-style tools and tool choice mapped, no ``seed``."""
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
        params["tools"] = [_chat_tool(tool) for tool in params["tools"]]
    if "tool_choice" in params:
        choice = tool_choice(params.pop("tool_choice"))
        if choice is not None:
            params["tool_choice"] = choice
    body.update(params)
    body["stream"] = True
    return body


def _chat_tool(chat_tool: Any) -> Any:
    """OpenAI's ``{"type": "function", "function": {…}}`` in Anthropic's shape; others as is,
    so one ``tools=`` list works with every protocol."""
    if (
        isinstance(chat_tool, Mapping)
        and chat_tool.get("type") == "function"
        and "function" in chat_tool
    ):
        function = chat_tool["function"]
        return tool(function["name"], function.get("description", ""), function.get("parameters"))
    return chat_tool


CLIENT = ClientWire(
    path="/v1" + PATH, request_body=client_body, auth_headers=auth_headers, decoder=MessagesDecoder
)
