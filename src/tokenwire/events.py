"""The typed events every stream is made of (DESIGN.md, "the lingua franca").

A response is a numbered log of these events. Backends and stages produce them without a
``seq``; the journal numbers them (0, 1, 2 …) as it appends. Protocols render them; nothing
else formats wire output.

Every stream ends with exactly one terminal event: ``stream.completed``,
``stream.cancelled`` or ``stream.failed``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

__all__ = [
    "EVENT_TYPES",
    "TERMINAL_TYPES",
    "Event",
    "GuardTriggered",
    "JsonPartial",
    "Progress",
    "StreamCancelled",
    "StreamCompleted",
    "StreamFailed",
    "StreamStarted",
    "TextDelta",
    "ToolCallCompleted",
    "ToolCallDelta",
    "ToolCallStarted",
    "ToolResult",
    "Usage",
    "aclose",
    "event_class",
    "event_from_dict",
]


#: Field names of each event class, in order (filled by ``Event.to_dict``).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


@dataclass(slots=True, kw_only=True)
class Event:
    """Base of all events. ``seq`` is -1 until the journal assigns it."""

    type: ClassVar[str] = "event"
    terminal: ClassVar[bool] = False

    seq: int = -1

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON-able data: ``{"type", "seq", …fields}``."""
        cls = type(self)
        names = _FIELD_NAMES.get(cls)
        if names is None:  # dataclasses.fields() is slow for a per-token path: once per class
            names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(self))
        data: dict[str, Any] = {"type": self.type}
        for name in names:
            data[name] = getattr(self, name)
        return data


@dataclass(slots=True, kw_only=True)
class StreamStarted(Event):
    type: ClassVar[str] = "stream.started"
    id: str
    model: str
    created: int


@dataclass(slots=True, kw_only=True)
class Progress(Event):
    """A background step: queueing, prefill, a tool running…"""

    type: ClassVar[str] = "progress"
    stage: str
    message: str = ""
    position: int | None = None
    fraction: float | None = None


@dataclass(slots=True, kw_only=True)
class TextDelta(Event):
    type: ClassVar[str] = "text.delta"
    text: str


@dataclass(slots=True, kw_only=True)
class ToolCallStarted(Event):
    type: ClassVar[str] = "tool_call.started"
    index: int
    id: str
    name: str


@dataclass(slots=True, kw_only=True)
class ToolCallDelta(Event):
    type: ClassVar[str] = "tool_call.delta"
    index: int
    arguments_delta: str


@dataclass(slots=True, kw_only=True)
class ToolCallCompleted(Event):
    """Emitted only once the arguments are complete and validated."""

    type: ClassVar[str] = "tool_call.completed"
    index: int
    id: str
    name: str
    arguments: str


@dataclass(slots=True, kw_only=True)
class ToolResult(Event):
    """A server-side tool ran (``tools.ToolLoop``): the call and what it returned.

    Its ``tool_call.*`` events are the server's business and not passed on (OpenAI clients
    would see calls to functions they never declared); wires that can show a tool the server
    ran (the UI message stream's tool parts) render this instead.
    """

    type: ClassVar[str] = "tool.result"
    id: str
    name: str
    arguments: str
    output: str
    #: The call failed (raised, timed out, bad arguments): ``output`` is the error message.
    error: bool = False


@dataclass(slots=True, kw_only=True)
class JsonPartial(Event):
    type: ClassVar[str] = "json.partial"
    value: Any
    path: str = ""


@dataclass(slots=True, kw_only=True)
class GuardTriggered(Event):
    """A guard on the streamed text fired; the stream ends with ``content_filter``."""

    type: ClassVar[str] = "guard.triggered"
    guard: str
    match: str = ""
    position: int | None = None  # character offset of the match in the streamed text


@dataclass(slots=True, kw_only=True)
class Usage(Event):
    type: ClassVar[str] = "usage"
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None = None
    tokens_per_second: float | None = None
    #: Prompt tokens whose KV cache was reused (the embedded model's prompt cache).
    cached_tokens: int | None = None


@dataclass(slots=True, kw_only=True)
class StreamCompleted(Event):
    type: ClassVar[str] = "stream.completed"
    terminal: ClassVar[bool] = True
    finish_reason: str = "stop"  # stop | length | tool_calls | content_filter


@dataclass(slots=True, kw_only=True)
class StreamCancelled(Event):
    type: ClassVar[str] = "stream.cancelled"
    terminal: ClassVar[bool] = True
    reason: str = "stop"  # stop | disconnect | shutdown


@dataclass(slots=True, kw_only=True)
class StreamFailed(Event):
    """Terminal failure; the partial output already journaled stays readable."""

    type: ClassVar[str] = "stream.failed"
    terminal: ClassVar[bool] = True
    error: dict[str, Any] = field(default_factory=dict)  # {type, message, code}


_EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        StreamStarted,
        Progress,
        TextDelta,
        ToolCallStarted,
        ToolCallDelta,
        ToolCallCompleted,
        ToolResult,
        JsonPartial,
        GuardTriggered,
        Usage,
        StreamCompleted,
        StreamCancelled,
        StreamFailed,
    )
}

#: Every event class by its wire name: the one vocabulary (client, renderers, UI tests).
EVENT_TYPES: Mapping[str, type[Event]] = MappingProxyType(_EVENT_TYPES)

TERMINAL_TYPES = frozenset(name for name, cls in _EVENT_TYPES.items() if cls.terminal)


def event_class(type_name: str) -> type[Event] | None:
    """The event class named ``type_name`` (None: a type this version does not know)."""
    return _EVENT_TYPES.get(type_name)


def event_from_dict(data: dict[str, Any]) -> Event:
    """Inverse of :meth:`Event.to_dict` (used by journals that serialize events)."""
    fields = dict(data)
    cls = _EVENT_TYPES[fields.pop("type")]
    return cls(**fields)


async def aclose(events: AsyncIterator[Event]) -> None:
    """Close an event iterator (an async generator: runs the backend's cleanup now)."""
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
