"""Wire protocols: wire models, ``parse`` into a ChatRequest, ``Renderer`` for events.

Protocol modules never call models. Each stream remembers the protocol it was started in,
so a resume renders the rest of it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tokenwire.events import Event
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols import native, openai_chat

__all__ = ["Renderer", "renderer_for"]


class Renderer(Protocol):
    def render(self, event: Event) -> Sequence[dict[str, Any] | str | bytes]: ...


_RENDERERS: dict[str, type] = {
    openai_chat.PROTOCOL: openai_chat.Renderer,
    native.PROTOCOL: native.Renderer,
}


def register(protocol: str, renderer: type) -> None:
    _RENDERERS[protocol] = renderer


def renderer_for(meta: StreamMeta) -> Renderer:
    renderer: Renderer = _RENDERERS[meta.protocol](meta)
    return renderer
