"""Upstream: an Anthropic Messages server (Anthropic's API, or anything speaking it).

Streams ``POST {url}/messages`` and turns its events into tokenwire's as they arrive:
``text_delta`` -> ``TextDelta``; a ``tool_use`` block -> ``ToolCallStarted``, its
``input_json_delta``s -> ``ToolCallDelta``, its ``content_block_stop`` ->
``ToolCallCompleted``; ``message_delta`` / ``message_stop`` -> ``Usage`` and
``StreamCompleted``. An ``error`` event is a ``BackendError``; a body that ends before
``message_stop`` means the upstream died mid-answer.

Conversion of the neutral request: system messages become the top-level ``system``, tool
results become ``tool_result`` blocks in a user turn, consecutive turns of one role are
merged (the API wants alternation), ``max_tokens`` falls back to the upstream's config, and
temperature is clamped to Anthropic's 0..1.
"""

from __future__ import annotations

from typing import Any

import orjson

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

__all__ = ["ANTHROPIC_VERSION", "AnthropicBackend", "AnthropicDecoder", "messages_body"]

ANTHROPIC_VERSION = "2023-06-01"

_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _tool_input(arguments: str) -> Any:
    try:
        return orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        return {"_raw": arguments}


def messages_body(request: ChatRequest, model: str, default_max_tokens: int) -> dict[str, Any]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for message in request.messages:
        if message.role == "system":
            system.append(message.content)
        elif message.role == "tool":
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": message.tool_call_id or "",
                        "content": message.content,
                    }
                ],
            )
        else:
            blocks: list[dict[str, Any]] = []
            if message.content:
                blocks.append({"type": "text", "text": message.content})
            for call in message.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": _tool_input(call.arguments),
                    }
                )
            if blocks:
                add(message.role, blocks)
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
        body["tools"] = [
            {
                "name": tool.name,
                "description": tool.description,
                "input_schema": tool.parameters or {"type": "object", "properties": {}},
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if isinstance(choice, str):
        mapped = {"auto": "auto", "required": "any", "any": "any", "none": "none"}.get(choice)
        if mapped:
            body["tool_choice"] = {"type": mapped}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name:
            body["tool_choice"] = {"type": "tool", "name": name}
    if request.extra.get("user"):
        body["metadata"] = {"user_id": str(request.extra["user"])}
    return body


class AnthropicDecoder(ChunkDecoder):
    def __init__(self) -> None:
        self._input_tokens = 0
        self._output_tokens = 0
        self._stop: str | None = None
        #: content block index -> [tool index, id, name, argument pieces]
        self._tools: dict[int, tuple[int, str, str, list[str]]] = {}
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def decode(self, event: str, data: bytes) -> list[Event]:
        message = load_json(data)
        if not isinstance(message, dict):
            raise BackendProtocolError(f"malformed upstream event: {data[:200]!r}")
        kind = message.get("type") or event
        try:
            return self._decode(kind, message)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BackendProtocolError(f"malformed upstream {kind} event: {data[:200]!r}") from exc

    def _decode(self, kind: str, message: dict[str, Any]) -> list[Event]:
        if kind == "content_block_delta":
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
        if kind == "content_block_start":
            block = message["content_block"]
            if block["type"] == "tool_use":
                tool_index = len(self._tools)
                self._tools[int(message["index"])] = (tool_index, block["id"], block["name"], [])
                return [ToolCallStarted(index=tool_index, id=block["id"], name=block["name"])]
            if block["type"] == "text" and block.get("text"):
                return [TextDelta(text=block["text"])]
            return []
        if kind == "content_block_stop":
            stopped = self._tools.get(int(message["index"]))
            if stopped is None:
                return []
            return [
                ToolCallCompleted(
                    index=stopped[0], id=stopped[1], name=stopped[2], arguments="".join(stopped[3])
                )
            ]
        if kind == "message_start":
            usage = message["message"].get("usage") or {}
            self._input_tokens = int(usage.get("input_tokens") or 0)
            self._output_tokens = int(usage.get("output_tokens") or 0)
            return []
        if kind == "message_delta":
            self._stop = message.get("delta", {}).get("stop_reason") or self._stop
            usage = message.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self._output_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens"):
                self._input_tokens = int(usage["input_tokens"])
            return []
        if kind == "message_stop":
            self._done = True
            return [
                Usage(prompt_tokens=self._input_tokens, completion_tokens=self._output_tokens),
                StreamCompleted(finish_reason=_STOP_REASONS.get(self._stop or "", "stop")),
            ]
        if kind == "error":
            error = message.get("error") or {}
            raise BackendUnavailable(
                f"upstream error: {error.get('type', 'error')}: {error.get('message', '')}",
                code="upstream_error",
            )
        return []  # ping, and event types added later

    def finish(self) -> list[Event]:
        raise BackendUnavailable(
            "the upstream closed the stream before message_stop", code="upstream_disconnected"
        )


class AnthropicBackend(UpstreamBackend):
    path = "/messages"

    def build_request(self, request: ChatRequest, model: str) -> tuple[str, dict[str, Any]]:
        return self.base_url + self.path, messages_body(request, model, self.config.max_tokens)

    def decoder(self) -> AnthropicDecoder:
        return AnthropicDecoder()

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def request_headers(self) -> dict[str, str]:
        return {"anthropic-version": ANTHROPIC_VERSION, **super().request_headers()}
