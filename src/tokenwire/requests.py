"""The neutral request every protocol parses into and every backend reads.

These are not wire models: each protocol owns its wire shapes and their validation; a
``ChatRequest`` is what is left once a request has been understood. Delivery options a
request may carry (``CoalesceSpec``: fewer, larger text frames, applied by
``stages/coalesce.py``) are parsed here, so every protocol and the config read them alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenwire.errors import InvalidRequest

__all__ = [
    "COALESCE_KEY",
    "OFF_COALESCE",
    "ChatRequest",
    "CoalesceSpec",
    "Message",
    "ResponseFormat",
    "SamplingParams",
    "Tool",
    "ToolCall",
    "parse_coalesce",
]

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(slots=True, kw_only=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(slots=True, kw_only=True)
class Message:
    role: Role
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context limit
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(slots=True, kw_only=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False


@dataclass(slots=True, kw_only=True)
class ChatRequest:
    model: str
    messages: list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    #: Ask the backend for usage (OpenAI ``stream_options.include_usage``); the event
    #: stream always carries usage, this only says whether the client wants to see it.
    include_usage: bool = False
    #: The last message is an assistant message to continue, not a finished turn (assistant
    #: prefill; vLLM's name): how another replica continues a stream it took over.
    continue_final_message: bool = False
    #: Opaque per-request options a protocol passes through (``user``, ``metadata`` …).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill(self) -> str:
        """The partial answer this request continues ("" unless ``continue_final_message``):
        stages that track the answer's text start from it."""
        if self.continue_final_message and self.messages and self.messages[-1].role == "assistant":
            return self.messages[-1].content
        return ""

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON-able data, for a journal to keep (another replica rebuilds it
        with ``from_dict`` to continue the stream). ``extra`` keeps only what JSON can hold;
        the coalescing choice is kept as its fields."""
        data = dataclasses.asdict(dataclasses.replace(self, extra={}))
        extra: dict[str, Any] = {}
        for key, value in self.extra.items():
            if isinstance(value, CoalesceSpec):
                extra[key] = {"mode": value.mode, "max_delay": value.max_delay}
            elif isinstance(value, str | int | float | bool | list | dict) or value is None:
                extra[key] = value
        data["extra"] = extra
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatRequest:
        """Inverse of :meth:`to_dict`."""
        extra = dict(data.get("extra") or {})
        if isinstance(extra.get(COALESCE_KEY), dict):
            extra[COALESCE_KEY] = CoalesceSpec(**extra[COALESCE_KEY])
        messages = [
            Message(
                **{
                    **message,
                    "tool_calls": [ToolCall(**call) for call in message.get("tool_calls") or []],
                }
            )
            for message in data["messages"]
        ]
        return cls(
            model=data["model"],
            messages=messages,
            sampling=SamplingParams(**data.get("sampling") or {}),
            tools=[Tool(**tool) for tool in data.get("tools") or []],
            tool_choice=data.get("tool_choice"),
            response_format=ResponseFormat(**data.get("response_format") or {}),
            include_usage=bool(data.get("include_usage")),
            continue_final_message=bool(data.get("continue_final_message")),
            extra=extra,
        )


# -- delivery options ------------------------------------------------------------------------

#: Where a request's parsed coalescing choice lives (``ChatRequest.extra``).
COALESCE_KEY = "coalesce"
DEFAULT_MAX_DELAY = 1.0
_MAX_DELAY_LIMIT_MS = 60_000


@dataclass(slots=True, frozen=True)
class CoalesceSpec:
    """How ``stages/coalesce.py`` merges text deltas (its docstring explains the forms)."""

    mode: Literal["none", "word", "line"] = "none"
    max_delay: float | None = None  # seconds

    @property
    def off(self) -> bool:
        return self.mode == "none" and self.max_delay is None


OFF_COALESCE = CoalesceSpec()


def parse_coalesce(value: Any, *, param: str = "stream_options.coalesce") -> CoalesceSpec:
    """Validate a wire or config value; raise ``InvalidRequest`` naming ``param``."""
    if value is None or value is False or value == "off":
        return OFF_COALESCE
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("word", "line"):
            return CoalesceSpec(mode=text, max_delay=DEFAULT_MAX_DELAY)  # type: ignore[arg-type]
        if text.endswith("ms") and text[:-2].strip().isdigit():
            return parse_coalesce({"max_delay_ms": int(text[:-2])}, param=param)
    elif isinstance(value, dict):
        unknown = set(value) - {"mode", "max_delay_ms"}
        mode = value.get("mode", "none")
        delay = value.get("max_delay_ms")
        if not unknown and mode in ("none", "word", "line"):
            if delay is None and mode != "none":
                return CoalesceSpec(mode=mode, max_delay=DEFAULT_MAX_DELAY)
            if (
                isinstance(delay, int)
                and not isinstance(delay, bool)
                and 1 <= delay <= _MAX_DELAY_LIMIT_MS
            ):
                return CoalesceSpec(mode=mode, max_delay=delay / 1000)
    raise InvalidRequest(
        f'{param} must be "word", "line", "off" or {{"max_delay_ms": 1..{_MAX_DELAY_LIMIT_MS}}}'
        f' (optionally with "mode": "word" | "line"), not {value!r}.',
        param=param,
    )
