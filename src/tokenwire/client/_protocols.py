"""Wire protocols the client speaks, each read through its codec into ``tokenwire.events``.

- ``native``: tokenwire's ``POST /v1/streams``; the events arrive as they are.
- ``openai``: ``POST /v1/chat/completions`` with ``stream: true`` on any OpenAI-compatible
  server (tokenwire, vLLM, llama.cpp, OpenAI …); chunks become events.
- ``anthropic``: ``POST /v1/messages`` on any Anthropic Messages server; its event types
  (``message_start``, ``content_block_delta`` …) become events.
- ``responses``: ``POST /v1/responses`` (OpenAI's Responses API) with ``stream: true``; its
  events (``response.output_text.delta`` …) become events, and a cancelled response's
  ``response.cancelled`` becomes ``stream.cancelled``.

The decoding is the wire's codec (``tokenwire.codecs``), the same one the gateway uses on
its upstreams. A mapper adds what only a reader of a whole stream needs, and knows nothing
of sockets: the request's path, body and headers; ``seq`` numbers (the SSE ``id`` when the
server sends numeric ids, as tokenwire does for every protocol, else a running count); a
``stream.started`` for wires that have none; a failure the stream reports becomes a
``stream.failed`` event rather than an exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

from tokenwire.codecs import ServerSentEvent, WireDecoder, WireError
from tokenwire.codecs import anthropic as anthropic_wire
from tokenwire.codecs import native as native_wire
from tokenwire.codecs import openai as openai_wire
from tokenwire.codecs import responses as responses_wire
from tokenwire.errors import BackendError
from tokenwire.events import Event, StreamFailed, StreamStarted

__all__ = [
    "AnthropicMapper",
    "Mapper",
    "NativeMapper",
    "OpenAIMapper",
    "ProtocolName",
    "ResponsesMapper",
    "build_request",
    "mapper_for",
    "to_wire_messages",
]

ProtocolName = Literal["native", "openai", "anthropic", "responses"]


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


def auth_headers(protocol: ProtocolName, api_key: str | None) -> dict[str, str]:
    return {"accept": "text/event-stream", **_mapper_class(protocol).headers(api_key)}


class Mapper:
    """One wire protocol, client side: how to start a stream, and its SSE events as
    tokenwire events (through the wire's codec)."""

    protocol: ClassVar[ProtocolName] = "native"
    #: Where a stream of this protocol starts.
    path: ClassVar[str] = native_wire.PATH
    #: Whether the wire announces the stream itself (else the mapper adds ``stream.started``).
    announces: ClassVar[bool] = True

    @staticmethod
    def request_body(
        model: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        return native_wire.request_body(model, messages, params)

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        return native_wire.auth_headers(api_key)

    @staticmethod
    def decoder() -> WireDecoder:
        return native_wire.EventDecoder()

    def __init__(self) -> None:
        self._count = -1
        self._decoder = self.decoder()
        self._announced = False
        self._failed = False
        self.stream_id: str | None = None

    def _seq(self, sse: ServerSentEvent) -> int:
        if sse.id.isdigit():
            self._count = int(sse.id)
        else:
            self._count += 1
        return self._count

    def on_event(self, sse: ServerSentEvent) -> list[Event]:
        seq = self._seq(sse)
        if self._failed:
            return []
        try:
            events = self._decoder.decode(sse.event, sse.data.encode())
        except WireError as exc:
            self._failed = True
            return [StreamFailed(seq=seq, error=exc.error)]
        return self._numbered(seq, events)

    def on_eof(self) -> list[Event]:
        """Events to finish with when the server closed cleanly without a terminal one
        (none when the answer was cut short: the stream is then interrupted)."""
        if self._failed or self._decoder.done:
            return []
        try:
            return self._numbered(self._count, self._decoder.finish())
        except BackendError:
            return []

    def _numbered(self, seq: int, events: list[Event]) -> list[Event]:
        if self.announces:  # native events carry their own seq and stream.started
            if events and isinstance(events[0], StreamStarted):
                self.stream_id = events[0].id
            return events
        started = self._decoder.started
        if not self._announced and started is not None:
            self._announced = True
            started.id = self.stream_id or started.id
            events = [started, *events]
        for event in events:
            event.seq = seq
        return events


class NativeMapper(Mapper):
    protocol: ClassVar[ProtocolName] = "native"


class OpenAIMapper(Mapper):
    protocol: ClassVar[ProtocolName] = "openai"
    path: ClassVar[str] = "/v1" + openai_wire.PATH
    announces: ClassVar[bool] = False

    @staticmethod
    def request_body(
        model: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"model": model, "messages": messages, **params, "stream": True}
        body.setdefault("stream_options", {"include_usage": True})
        return body

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        return openai_wire.auth_headers(api_key)

    @staticmethod
    def decoder() -> WireDecoder:
        return openai_wire.ChatDecoder()


class AnthropicMapper(Mapper):
    protocol: ClassVar[ProtocolName] = "anthropic"
    path: ClassVar[str] = "/v1" + anthropic_wire.PATH
    announces: ClassVar[bool] = False

    @staticmethod
    def request_body(
        model: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        """OpenAI-shaped arguments in Anthropic's shape: system apart, ``stop`` as
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
            params["tools"] = [_anthropic_tool(tool) for tool in params["tools"]]
        if "tool_choice" in params:
            choice = anthropic_wire.tool_choice(params.pop("tool_choice"))
            if choice is not None:
                params["tool_choice"] = choice
        body.update(params)
        body["stream"] = True
        return body

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        return anthropic_wire.auth_headers(api_key)

    @staticmethod
    def decoder() -> WireDecoder:
        return anthropic_wire.MessagesDecoder()


class ResponsesMapper(Mapper):
    protocol: ClassVar[ProtocolName] = "responses"
    path: ClassVar[str] = "/v1" + responses_wire.PATH
    announces: ClassVar[bool] = False

    @staticmethod
    def request_body(
        model: str, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        """Chat-shaped arguments as a Responses body (``codecs.responses``)."""
        return responses_wire.request_body(model, messages, params)

    @staticmethod
    def headers(api_key: str | None) -> dict[str, str]:
        return openai_wire.auth_headers(api_key)

    @staticmethod
    def decoder() -> WireDecoder:
        return responses_wire.ResponsesDecoder()


def _anthropic_tool(tool: Any) -> Any:
    """OpenAI's ``{"type": "function", "function": {…}}`` in Anthropic's shape; others as is,
    so one ``tools=`` list works with every protocol."""
    if isinstance(tool, Mapping) and tool.get("type") == "function" and "function" in tool:
        function = tool["function"]
        return anthropic_wire.tool(
            function["name"], function.get("description", ""), function.get("parameters")
        )
    return tool


_MAPPERS: dict[str, type[Mapper]] = {
    "native": NativeMapper,
    "openai": OpenAIMapper,
    "anthropic": AnthropicMapper,
    "responses": ResponsesMapper,
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
