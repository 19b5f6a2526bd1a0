"""tokenwire's own protocol: the journal's events as they are, the richest format.

``POST /v1/streams`` takes the chat-completions body (parsed by ``openai_chat.parse``) and
streams every event: SSE ``event: <type>``, ``id: <seq>``, ``data: {"type", "seq", …}``. The
WebSocket sends the same objects with a ``stream_id``. Errors use OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any

from tokenwire.events import Event
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.openai_chat import error_body, parse

__all__ = ["PROTOCOL", "Renderer", "error_body", "parse"]

PROTOCOL = "native"


class Renderer:
    #: Frames carry ``event: <payload type>`` so EventSource listeners can subscribe by type.
    event_names = True

    def __init__(self, meta: StreamMeta) -> None:
        self.meta = meta

    def render(self, event: Event) -> list[dict[str, Any] | str]:
        return [event.to_dict()]
