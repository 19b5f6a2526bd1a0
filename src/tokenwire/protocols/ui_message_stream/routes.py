"""The UI chat's routes: answer, resume, Stop and the WebSocket, one running answer per chat;
the protocol object the registry lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from pydantic import ValidationError
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from tokenwire.config import Settings
from tokenwire.errors import InvalidRequest, RequestError, TokenwireError
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import (
    Context,
    Endpoint,
    JSONResponse,
    Parsed,
    Reply,
    WireProtocol,
)
from tokenwire.protocols.conversation import message_dict, message_from_dict
from tokenwire.protocols.ui_message_stream.renderer import (
    DEFAULT_VERSION,
    VERSIONS,
    Renderer,
    message_id,
)
from tokenwire.protocols.ui_message_stream.request import (
    ChatBody,
    StopBody,
    answer_messages,
    parse_body,
    to_messages,
)
from tokenwire.protocols.ui_message_stream.websocket import Session
from tokenwire.requests import ChatRequest, Message, SamplingParams

__all__ = ["PROTOCOL", "ChatBusy", "UIMessageStream"]


class ChatBusy(RequestError):
    """409: the chat already has an answer streaming."""

    status_code = 409
    error_type = "conflict_error"


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
            parsed.render["history"] = [message_dict(m) for m in [*history, *rest]]
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
        history = [message_from_dict(m) for m in meta.render.get("history", [])]
        return [*history, *answer_messages([event async for event in ctx.read(previous)])]

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
        session = Session(self, ctx, websocket)
        try:
            await session.run()
        finally:
            await session.close()


def _name(chat: str) -> str:
    return f"ui-chat:{chat}"


PROTOCOL = UIMessageStream()
