"""A conversation as JSON: the messages a stream keeps (``StreamMeta.render``) for the answer
that continues it (a Responses ``previous_response_id``, a UI chat's next message)."""

from __future__ import annotations

from typing import Any

from tokenwire.requests import Message, ToolCall

__all__ = ["message_dict", "message_from_dict"]


def message_dict(message: Message) -> dict[str, Any]:
    """``message`` as JSON: role, content, and its tool calls or the call it answers."""
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    return data


def message_from_dict(data: dict[str, Any]) -> Message:
    """The ``Message`` that ``message_dict`` wrote."""
    return Message(
        role=data["role"],
        content=data.get("content", ""),
        tool_calls=[ToolCall(**call) for call in data.get("tool_calls", [])],
        tool_call_id=data.get("tool_call_id"),
    )
