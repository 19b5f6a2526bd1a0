"""The AI SDK's UI message stream: a drop-in backend for ``useChat``, with resume and Stop.

Routes (``/api/chat`` by default; ``--ui-chat-path`` moves them):

- ``POST /api/chat``: the body ``DefaultChatTransport`` sends (``id`` = chat id, ``messages``
  as UIMessages with ``parts``, ``trigger``, ``messageId``; other keys tolerated, a few read:
  ``model``, ``system``, ``temperature``, ``topP``, ``seed``, ``maxOutputTokens``,
  ``stopSequences``). Answers the UI message stream as SSE: ``start{messageId}``,
  ``start-step``, ``text-start``/``text-delta``/``text-end``, tool parts, ``data-*`` parts,
  ``finish-step``, ``finish{finishReason}``, then ``data: [DONE]``.
- ``GET /api/chat/{id}/stream``: the chat's running answer from its ``start`` (same
  ``messageId``; the SDK's ``DefaultChatTransport`` treats a resume as a replay), then live,
  on any replica sharing the journal; **204** with no body when nothing runs. Costs one
  lookup: no model work.
- ``POST /api/chat/{id}/stop`` and ``DELETE /api/chat/{id}/stream`` (the SDK example's
  form): Stop. Readers get the open text block closed, ``abort``, ``[DONE]``. A body or query
  naming the answer (``messageId``, or ``activeStreamId`` = the ``X-Stream-Id``) that is not
  the running one is stale and stops nothing (``{"stopped": false}``), so a late Stop never
  cancels a newer answer.
- ``WEBSOCKET /api/chat``: ai@7's ``WebSocketChatTransport`` (``send`` / ``resume`` /
  ``abort`` frames in; ``chunk{sequence}`` / ``end`` / ``error`` / ``no-active`` out).
  ``abort`` is Stop; a closed socket is a disconnect (the answer goes on, resumable).

A chat has one running answer: tokenwire names the stream by ``(API key, chat id)`` while it
runs (``Context.name_stream``), and a second POST for a chat whose answer still streams gets
**409** (the SDK never sends one: ``useChat`` waits for the answer or stops it first).

Deliberate divergences, and why:
- The chunk set follows the client's major version (``--ui-chat-version``, 6 by
  default, or ``uiMessageStreamVersion`` in the body): ai@5.0's schema is strict and throws
  on ``finish.finishReason`` and ``abort.reason``, which 6 and 7 read. Nothing else differs.
- Positions ride in SSE ``id:`` lines only (the client ignores them): the SDK's schema has no
  field for them, and a resume replays from ``start`` anyway.
- Progress (queue position, prefill, server-side tools running) is a transient ``data-progress``
  part: ``onData`` sees it, the message keeps none of it. A guard that fired is a persistent
  ``data-guard`` part, so the UI can say why the answer stopped.
- Usage travels as ``finish.messageMetadata.usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tokenwire.config import Settings
from tokenwire.errors import InvalidRequest, RequestError, TokenwireError
from tokenwire.events import (
    Event,
    GuardTriggered,
    Progress,
    StreamCancelled,
    StreamCompleted,
    StreamFailed,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    Usage,
)
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import (
    Context,
    Endpoint,
    JSONResponse,
    Parsed,
    Payload,
    Reply,
    WireProtocol,
)
from tokenwire.protocols.base import Renderer as BaseRenderer
from tokenwire.requests import ChatRequest, Message, SamplingParams, ToolCall

__all__ = ["ChatBody", "ChatBusy", "Renderer", "UIMessageStream"]

#: The terminal sentinel of a UI message stream over SSE.
DONE = "[DONE]"
#: Client majors whose chunk sets differ (see the module docstring).
VERSIONS = (5, 6, 7)
DEFAULT_VERSION = 6

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
}


class ChatBusy(RequestError):
    """409: the chat already has an answer streaming."""

    status_code = 409
    error_type = "conflict_error"


# -- wire models ---------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class UIMessage(_Wire):
    id: str = ""
    role: Literal["system", "user", "assistant"]
    parts: list[dict[str, Any]] = Field(default_factory=list)
    metadata: Any = None


class ChatBody(_Wire):
    """What ``DefaultChatTransport`` POSTs (plus the tokenwire options it may carry in
    ``body``). Either ``messages`` (the whole chat, as ``useChat`` sends it) or ``message``
    (the last one only)."""

    id: str = Field(min_length=1, max_length=256)
    messages: list[UIMessage] | None = None
    message: UIMessage | None = None
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = None
    model: str = "default"
    system: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    topP: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    maxOutputTokens: int | None = Field(default=None, ge=1)
    stopSequences: list[str] | None = None
    #: streamText's ``toolChoice``: auto, none, required, or {type: "tool", toolName}.
    toolChoice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    uiMessageStreamVersion: int | None = None


class StopBody(_Wire):
    messageId: str | None = None
    activeStreamId: str | None = None


# -- parse ---------------------------------------------------------------------------------


def _text(parts: list[dict[str, Any]]) -> str:
    return "".join(
        part["text"]
        for part in parts
        if part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _tool_name(part: dict[str, Any]) -> str | None:
    kind = part.get("type")
    if not isinstance(kind, str):
        return None
    if kind == "dynamic-tool":
        name = part.get("toolName")
        return name if isinstance(name, str) else None
    return kind[len("tool-") :] if kind.startswith("tool-") else None


def _assistant_messages(parts: list[dict[str, Any]]) -> list[Message]:
    """One assistant UIMessage as the conversation the model had: per step, its text and
    tool calls, then a ``tool`` message per call with its output (or error)."""
    out: list[Message] = []
    steps: list[list[dict[str, Any]]] = [[]]
    for part in parts:
        if part.get("type") == "step-start" and steps[-1]:
            steps.append([])
        else:
            steps[-1].append(part)
    for step in steps:
        calls: list[ToolCall] = []
        results: list[Message] = []
        for part in step:
            name = _tool_name(part)
            call_id = part.get("toolCallId")
            if name is None or not isinstance(call_id, str):
                continue
            state = part.get("state")
            if state not in ("output-available", "output-error"):
                continue  # a call the client never answered: not part of the history
            calls.append(ToolCall(id=call_id, name=name, arguments=_json(part.get("input"))))
            result = (
                _json(part.get("output"))
                if state == "output-available"
                else f"error: {part.get('errorText', '')}"
            )
            results.append(Message(role="tool", content=result, tool_call_id=call_id))
        text = _text(step)
        if text or calls:
            out.append(Message(role="assistant", content=text, tool_calls=calls))
        out.extend(results)
    return out


def _json(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode() if value is not None else "{}"


def to_messages(ui_messages: Sequence[UIMessage]) -> list[Message]:
    """UIMessages (``parts``) as the neutral conversation."""
    messages: list[Message] = []
    for message in ui_messages:
        if message.role == "assistant":
            messages.extend(_assistant_messages(message.parts))
        else:
            messages.append(Message(role=message.role, content=_text(message.parts)))
    return messages


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return InvalidRequest(f"Invalid request: {param}: {first['msg']}", param=param)


def parse_body(body: Any) -> ChatBody:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return ChatBody.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


# -- render --------------------------------------------------------------------------------


def message_id(meta: StreamMeta) -> str:
    """The assistant message's id: the one the request continues, else the stream's."""
    continued = meta.render.get("message_id")
    return continued if isinstance(continued, str) else f"msg-{meta.id}"


class Renderer(BaseRenderer):
    """A stream's events as UI message chunks, for one reader.

    Stateful: text blocks open and close around other parts (``text-start`` … ``text-end``
    with one id), and a tool call's input streams between ``tool-input-start`` and
    ``tool-input-available``. Every reader renders from the stream's start (a resume is a
    replay for the SDK), so the state is rebuilt the same way on any replica.
    """

    needs_history: ClassVar[bool] = True
    #: A structured answer's text streams as text parts already; its parsed prefixes have
    #: no chunk of their own.
    drops: ClassVar[frozenset[str]] = frozenset({"json.partial"})

    def __init__(self, meta: StreamMeta) -> None:
        super().__init__(meta)
        version = meta.render.get("version", DEFAULT_VERSION)
        self.version = version if version in VERSIONS else DEFAULT_VERSION
        self._text_id: str | None = None
        self._blocks = 0
        self._open_tools: dict[int, tuple[str, str]] = {}
        self._usage: Usage | None = None
        #: Server-side tools ran in this step: the next output opens a new step.
        self._tools_ran = False
        self._started = False
        # A text delta is the same JSON but for its id and delta: encode once, splice.
        self._delta_head = b""

    def _close_text(self, out: list[Payload]) -> None:
        if self._text_id is not None:
            out.append({"type": "text-end", "id": self._text_id})
            self._text_id = None

    def _next_step(self, out: list[Payload]) -> None:
        if self._tools_ran:
            self._tools_ran = False
            out.append({"type": "finish-step"})
            out.append({"type": "start-step"})

    def render(self, event: Event) -> Sequence[Payload]:
        if type(event) is TextDelta:
            if self._text_id is None:
                out: list[Payload] = []
                self._next_step(out)
                self._blocks += 1
                self._text_id = f"text-{self._blocks}"
                head = orjson.dumps({"type": "text-delta", "id": self._text_id, "delta": ""})
                self._delta_head = head[: -len(b'""}')]  # up to and including "delta":
                out.append({"type": "text-start", "id": self._text_id})
                out.append(self._delta_head + orjson.dumps(event.text) + b"}")
                return out
            return [self._delta_head + orjson.dumps(event.text) + b"}"]
        out = []
        if isinstance(event, StreamStarted):
            if not self._started:  # again: another replica took the stream over
                self._started = True
                out.append({"type": "start", "messageId": message_id(self.meta)})
                out.append({"type": "start-step"})
        elif isinstance(event, Progress):
            data: dict[str, Any] = {"stage": event.stage, "message": event.message}
            if event.position is not None:
                data["position"] = event.position
            if event.fraction is not None:
                data["fraction"] = event.fraction
            out.append({"type": "data-progress", "id": "progress", "data": data, "transient": True})
        elif isinstance(event, ToolCallStarted):
            self._close_text(out)
            self._next_step(out)
            self._open_tools[event.index] = (event.id, event.name)
            out.append({"type": "tool-input-start", "toolCallId": event.id, "toolName": event.name})
        elif isinstance(event, ToolCallDelta):
            opened = self._open_tools.get(event.index)
            if opened is not None and event.arguments_delta:
                out.append(
                    {
                        "type": "tool-input-delta",
                        "toolCallId": opened[0],
                        "inputTextDelta": event.arguments_delta,
                    }
                )
        elif isinstance(event, ToolCallCompleted):
            self._close_text(out)
            self._open_tools.pop(event.index, None)
            arguments = _loads(event.arguments or "{}")
            out.append(
                {
                    "type": "tool-input-available",
                    "toolCallId": event.id,
                    "toolName": event.name,
                    "input": arguments,
                }
            )
        elif isinstance(event, ToolResult):
            self._close_text(out)
            base = {"toolCallId": event.id, "toolName": event.name}
            out.append({"type": "tool-input-start", **base})
            out.append({"type": "tool-input-available", **base, "input": _loads(event.arguments)})
            if event.error:
                out.append(
                    {"type": "tool-output-error", "toolCallId": event.id, "errorText": event.output}
                )
            else:
                out.append(
                    {
                        "type": "tool-output-available",
                        "toolCallId": event.id,
                        "output": _loads(event.output),
                    }
                )
            self._tools_ran = True
        elif isinstance(event, GuardTriggered):
            self._close_text(out)
            out.append(
                {
                    "type": "data-guard",
                    "data": {
                        "guard": event.guard,
                        "match": event.match,
                        "position": event.position,
                    },
                }
            )
        elif isinstance(event, Usage):
            self._usage = event
        elif isinstance(event, StreamCompleted):
            self._close_text(out)
            out.append({"type": "finish-step"})
            finish: dict[str, Any] = {"type": "finish"}
            if self.version >= 6:
                finish["finishReason"] = _FINISH_REASONS.get(event.finish_reason, "other")
            if self._usage is not None:
                finish["messageMetadata"] = {"usage": _usage(self._usage)}
            out.append(finish)
            out.append(DONE)
        elif isinstance(event, StreamCancelled):
            self._close_text(out)
            out.append(
                {"type": "abort", "reason": event.reason}
                if self.version >= 6
                else {"type": "abort"}
            )
            out.append(DONE)
        elif isinstance(event, StreamFailed):
            self._close_text(out)
            out.append({"type": "error", "errorText": str(event.error.get("message") or "error")})
            out.append(DONE)
        return out


def _loads(text: str) -> Any:
    """JSON text as its value (tool inputs and outputs are objects for the UI); else the
    text itself."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _usage(usage: Usage) -> dict[str, Any]:
    data: dict[str, Any] = {
        "inputTokens": usage.prompt_tokens,
        "outputTokens": usage.completion_tokens,
        "totalTokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.cached_tokens is not None:
        data["cachedInputTokens"] = usage.cached_tokens
    return data


# -- the protocol --------------------------------------------------------------------------

#: ``error_body``'s shape.
ERROR_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_CHAT_ID: dict[str, Any] = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}


class UIMessageStream(WireProtocol):
    """``useChat``'s backend (see the module docstring)."""

    name = "ui_message_stream"
    stream_headers: ClassVar[Mapping[str, str]] = {"x-vercel-ai-ui-message-stream": "v1"}
    request_model = ChatBody
    error_schema = ERROR_SCHEMA

    def __init__(self, path: str = "/api/chat", version: int = DEFAULT_VERSION) -> None:
        if not path.startswith("/"):
            raise ValueError(f"the UI chat path must start with /, not {path!r}")
        if version not in VERSIONS:
            raise ValueError(f"the UI chat version must be one of {list(VERSIONS)}, not {version}")
        self.path = path.rstrip("/") or "/api/chat"
        self.version = version

    def configured(self, settings: Settings) -> UIMessageStream:
        """``--ui-chat-path`` and ``--ui-chat-version`` applied."""
        return UIMessageStream(path=settings.ui_chat_path, version=settings.ui_chat_version)

    def routes(self) -> Sequence[Endpoint]:
        stream = f"{self.path}/{{id}}/stream"
        return (
            Endpoint(
                path=self.path,
                method="POST",
                handler=self.create,
                operation_id="uiChat",
                body=ChatBody,
                summary="The UI message stream (AI SDK useChat)",
            ),
            Endpoint(path=self.path, method="WEBSOCKET", handler=self.websocket),
            Endpoint(
                path=stream,
                method="GET",
                handler=self.resume_chat,
                operation_id="uiChatResume",
                parameters=(_CHAT_ID,),
                summary="The chat's running answer from its start; 204 when none runs",
            ),
            Endpoint(
                path=stream,
                method="DELETE",
                handler=self.stop,
                operation_id="uiChatStopStream",
                parameters=(_CHAT_ID,),
                summary="Stop the chat's running answer",
                streams=False,
            ),
            Endpoint(
                path=f"{self.path}/{{id}}/stop",
                method="POST",
                handler=self.stop,
                operation_id="uiChatStop",
                parameters=(_CHAT_ID,),
                body=StopBody,
                summary="Stop the chat's running answer",
                streams=False,
            ),
        )

    # -- parse / render ----------------------------------------------------------------------

    def parse(self, body: Any) -> Parsed:
        wire = parse_body(body)
        version = wire.uiMessageStreamVersion or self.version
        if version not in VERSIONS:
            raise InvalidRequest(
                f"uiMessageStreamVersion must be one of {list(VERSIONS)}.",
                param="uiMessageStreamVersion",
            )
        if wire.messages is not None:
            ui_messages = wire.messages
        elif wire.message is not None:
            ui_messages = [wire.message]
        else:
            raise InvalidRequest("messages (or message) is required.", param="messages")
        messages = to_messages(ui_messages)
        if wire.system:
            messages.insert(0, Message(role="system", content=wire.system))
        if not any(m.content.strip() or m.tool_calls for m in messages):
            raise InvalidRequest("messages must contain some text.", param="messages")
        stop = list(wire.stopSequences or [])
        if any(s == "" for s in stop):
            raise InvalidRequest("stopSequences must not be empty.", param="stopSequences")
        tool_choice: str | dict[str, Any] | None = None
        if isinstance(wire.toolChoice, dict):
            name = wire.toolChoice.get("toolName")
            if wire.toolChoice.get("type") != "tool" or not isinstance(name, str):
                raise InvalidRequest(
                    'toolChoice must be auto, none, required or {"type": "tool", "toolName"}.',
                    param="toolChoice",
                )
            tool_choice = {"type": "function", "function": {"name": name}}
        else:
            tool_choice = wire.toolChoice
        request = ChatRequest(
            model=wire.model,
            messages=messages,
            sampling=SamplingParams(
                max_tokens=wire.maxOutputTokens,
                temperature=1.0 if wire.temperature is None else wire.temperature,
                top_p=1.0 if wire.topP is None else wire.topP,
                seed=wire.seed,
                stop=stop,
            ),
            tool_choice=tool_choice,
            include_usage=True,
        )
        render: dict[str, Any] = {"version": version, "chat": wire.id}
        if wire.messages is None:
            render["kept"] = True  # the server keeps the conversation (start_answer)
        last = ui_messages[-1] if ui_messages else None
        if last is not None and last.role == "assistant" and last.id:
            render["message_id"] = last.id  # continuing it (after a client-side tool)
        return Parsed(request=request, stream=True, render=render)

    def renderer(self, meta: StreamMeta) -> Renderer:
        return Renderer(meta)

    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        return {"error": {"message": exc.message, "type": exc.error_type, "code": exc.code}}

    # -- handlers ----------------------------------------------------------------------------

    async def active_answer(
        self, ctx: Context, connection: HTTPConnection, chat: str
    ) -> StreamMeta | None:
        """The chat's running answer, if any (another key's chat is none of this key's)."""
        stream_id = await ctx.named_stream(connection, _name(chat))
        if stream_id is None:
            return None
        try:
            return await ctx.owned_meta(connection, stream_id)
        except TokenwireError:
            return None

    async def start_answer(self, ctx: Context, connection: HTTPConnection, body: Any) -> StreamMeta:
        """Parse, refuse a busy chat, add the kept conversation (the ``{id, message}`` form),
        start, and name the stream after the chat: the POST's and the WebSocket's ``send``."""
        parsed = self.parse(body)
        chat = parsed.render["chat"]
        if await self.active_answer(ctx, connection, chat) is not None:
            raise ChatBusy(
                f"Chat {chat!r} already has an answer streaming: resume it "
                f"(GET {self.path}/{{id}}/stream) or stop it first.",
                param="id",
                code="chat_busy",
            )
        if parsed.render.get("kept"):
            history = await self._kept_conversation(ctx, connection, chat)
            messages = parsed.request.messages
            system = [m for m in messages if m.role == "system"]
            rest = [m for m in messages if m.role != "system"]
            parsed.request.messages = [*system, *history, *rest]
            parsed.render["history"] = [_message_dict(m) for m in [*history, *rest]]
        meta = await ctx.start(self, parsed, connection)
        await ctx.name_stream(connection, _name(chat), meta.id)
        return meta

    async def _kept_conversation(
        self, ctx: Context, connection: HTTPConnection, chat: str
    ) -> list[Message]:
        """The chat so far, for the one-message form: the last answer's own conversation (kept
        in its ``render``) and the answer itself (its events)."""
        previous = await ctx.named_stream(connection, _name(chat), running=False)
        if previous is None:
            return []
        meta = await ctx.owned_meta(connection, previous)  # 410 once it expired
        history = [_message_from_dict(m) for m in meta.render.get("history", [])]
        return [*history, *_answer_messages([event async for event in ctx.read(previous)])]

    async def create(self, ctx: Context, request: Request) -> Reply:
        meta = await self.start_answer(ctx, request, await ctx.read_json(request))
        return ctx.event_stream(meta)

    async def resume_chat(self, ctx: Context, request: Request) -> Reply:
        meta = await self.active_answer(ctx, request, request.path_params["id"])
        if meta is None:
            return Response(status_code=204)
        return ctx.event_stream(meta)

    async def stop(self, ctx: Context, request: Request) -> Reply:
        chat = request.path_params["id"]
        wanted = StopBody.model_validate(dict(request.query_params))
        if request.method == "POST":
            body = await request.body()
            if body.strip():
                try:
                    wanted = StopBody.model_validate(orjson.loads(body))
                except (orjson.JSONDecodeError, ValidationError) as exc:
                    raise InvalidRequest("The stop body must be a JSON object.") from exc
        meta = await self.active_answer(ctx, request, chat)
        if meta is None:
            return JSONResponse({"id": chat, "stopped": False, "reason": "no answer is running"})
        stale = (wanted.messageId is not None and wanted.messageId != message_id(meta)) or (
            wanted.activeStreamId is not None and self.stream_id(wanted.activeStreamId) != meta.id
        )
        if stale:
            return JSONResponse(
                {"id": chat, "stopped": False, "reason": "stale: another answer is running"}
            )
        await ctx.cancel(meta.id)
        return JSONResponse({"id": chat, "stopped": True, "messageId": message_id(meta)})

    # -- ai@7's WebSocketChatTransport -------------------------------------------------------

    async def websocket(self, ctx: Context, websocket: WebSocket) -> None:
        await websocket.accept()
        session = _Session(self, ctx, websocket)
        try:
            await session.run()
        finally:
            await session.close()


def _name(chat: str) -> str:
    return f"ui-chat:{chat}"


def _message_dict(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    return data


def _message_from_dict(data: dict[str, Any]) -> Message:
    return Message(
        role=data["role"],
        content=data.get("content", ""),
        tool_calls=[ToolCall(**call) for call in data.get("tool_calls", [])],
        tool_call_id=data.get("tool_call_id"),
    )


def _answer_messages(events: list[Event]) -> list[Message]:
    """A finished answer's events as the conversation the model had: per step its text and
    the server-side tools it ran (``tool.result``), then their results."""
    out: list[Message] = []
    text: list[str] = []
    calls: list[ToolCall] = []
    results: list[Message] = []

    def flush() -> None:
        if text or calls:
            out.append(Message(role="assistant", content="".join(text), tool_calls=list(calls)))
        out.extend(results)
        text.clear()
        calls.clear()
        results.clear()

    for event in events:
        if isinstance(event, TextDelta):
            if calls:
                flush()
            text.append(event.text)
        elif isinstance(event, ToolResult):
            calls.append(ToolCall(id=event.id, name=event.name, arguments=event.arguments))
            results.append(Message(role="tool", content=event.output, tool_call_id=event.id))
    flush()
    return out


class _Session:
    """One WebSocket: requests multiplexed by ``requestId``, each a reader of one stream."""

    def __init__(self, protocol: UIMessageStream, ctx: Context, websocket: WebSocket) -> None:
        self.protocol = protocol
        self.ctx = ctx
        self.websocket = websocket
        self.pumps: dict[str, asyncio.Task[None]] = {}
        self.streams: dict[str, str] = {}
        self.send_lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.send_lock:
            await asyncio.wait_for(
                self.websocket.send_text(orjson.dumps(frame).decode()), self.ctx.send_timeout
            )

    async def run(self) -> None:
        while True:
            try:
                text = await self.websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                frame = orjson.loads(text)
            except orjson.JSONDecodeError:
                frame = None
            if not isinstance(frame, dict) or not isinstance(frame.get("requestId"), str):
                await self.send({"type": "error", "requestId": "", "errorText": "bad frame"})
                continue
            request_id = frame["requestId"]
            try:
                await self.handle(request_id, frame)
            except TokenwireError as exc:
                await self.send(
                    {"type": "error", "requestId": request_id, "errorText": exc.message}
                )

    async def handle(self, request_id: str, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "abort":
            stream_id = self.streams.get(request_id)
            if stream_id is not None:
                await self.ctx.cancel(stream_id)
            return
        chat = frame.get("id")
        if not isinstance(chat, str) or not chat:
            raise InvalidRequest("id (the chat id) is required.", param="id")
        if kind == "resume":
            meta = await self.protocol.active_answer(self.ctx, self.websocket, chat)
            if meta is None:
                await self.send({"type": "no-active", "requestId": request_id})
                return
            last = frame.get("lastSequence")
            self._pump(request_id, meta, last if isinstance(last, int) else -1)
            return
        if kind != "send":
            raise InvalidRequest(f"unknown frame type {kind!r}.", param="type")
        extra = frame.get("body")
        body: dict[str, Any] = extra if isinstance(extra, dict) else {}
        meta = await self.protocol.start_answer(
            self.ctx,
            self.websocket,
            {
                **body,
                "id": chat,
                "messages": frame.get("messages"),
                "trigger": frame.get("trigger", "submit-message"),
                "messageId": frame.get("messageId"),
            },
        )
        self._pump(request_id, meta, -1)

    def _pump(self, request_id: str, meta: StreamMeta, last_sequence: int) -> None:
        self.streams[request_id] = meta.id
        task = asyncio.ensure_future(self._forward(request_id, meta, last_sequence))
        self.pumps[request_id] = task
        task.add_done_callback(lambda _: self.pumps.pop(request_id, None))

    async def _forward(self, request_id: str, meta: StreamMeta, last_sequence: int) -> None:
        renderer = self.protocol.renderer(meta)
        sequence = -1
        try:
            async for event in self.ctx.read(meta.id):
                for payload in renderer.render(event):
                    if isinstance(payload, str):  # [DONE]: the end frame says it here
                        continue
                    sequence += 1
                    if sequence <= last_sequence:
                        continue
                    chunk = orjson.loads(payload) if isinstance(payload, bytes) else payload
                    await self.send(
                        {
                            "type": "chunk",
                            "requestId": request_id,
                            "sequence": sequence,
                            "chunk": chunk,
                        }
                    )
            await self.send({"type": "end", "requestId": request_id})
        except (WebSocketDisconnect, RuntimeError, TimeoutError, OSError):
            return  # the socket went: a disconnect, the answer goes on (resumable)
        except TokenwireError as exc:
            with contextlib.suppress(Exception):
                await self.send(
                    {"type": "error", "requestId": request_id, "errorText": exc.message}
                )

    async def close(self) -> None:
        for task in list(self.pumps.values()):
            task.cancel()
        for task in list(self.pumps.values()):
            with contextlib.suppress(BaseException):
                await task
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.websocket.close()


PROTOCOL = UIMessageStream()
