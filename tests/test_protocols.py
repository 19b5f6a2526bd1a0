"""The WireProtocol interface (protocols/base.py) and the registry.

- every registered renderer answers to the event vocabulary (``events.EVENT_TYPES``): each type
  either changes what it sends or is declared in its ``drops``, so a new event type is a
  decision for every wire;
- a protocol is its module plus one registry line: a toy protocol, given to ``create_app`` as
  the registry, gets its routes (beyond POST: a GET answering 204, a stop), its error shape
  (handler errors, the auth gate's 401, a wrong method's 405), its stream headers, its
  terminal sentinel, named streams and its place in ``/openapi.json``, with no edit to the
  server. It runs on the embedded model behind a real uvicorn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import httpx
import orjson
import pytest
import uvicorn
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.config import Settings
from tokenwire.errors import InvalidRequest, StreamNotFound, TokenwireError
from tokenwire.events import (
    EVENT_TYPES,
    Event,
    GuardTriggered,
    JsonPartial,
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
    Renderer,
    Reply,
    WireProtocol,
)
from tokenwire.protocols.registry import PROTOCOLS
from tokenwire.requests import ChatRequest, Message, SamplingParams
from tokenwire.server.app import create_app
from tokenwire.server.http import HttpProtocol

from .conftest import free_port, wait_until_healthy

# -- the vocabulary ------------------------------------------------------------------------

#: One event of each type; a new type in events.py fails here until it has a sample.
SAMPLES: dict[str, Event] = {
    "progress": Progress(stage="prefill", message="reading the prompt"),
    "text.delta": TextDelta(text="Hello"),
    "tool_call.started": ToolCallStarted(index=0, id="call_1", name="lookup"),
    "tool_call.delta": ToolCallDelta(index=0, arguments_delta='{"q": 1}'),
    "tool_call.completed": ToolCallCompleted(
        index=0, id="call_1", name="lookup", arguments='{"q": 1}'
    ),
    "tool.result": ToolResult(id="call_2", name="clock", arguments="{}", output="noon"),
    "json.partial": JsonPartial(value={"a": 1}, path="a"),
    "guard.triggered": GuardTriggered(guard="secret", match="s3cret", position=4),
    "usage": Usage(prompt_tokens=3, completion_tokens=2),
}
_STRUCTURAL = {StreamStarted.type, StreamCompleted.type, StreamCancelled.type, StreamFailed.type}
#: What must come first for an event to mean something (a delta belongs to a started call).
_CONTEXT: dict[str, list[Event]] = {
    "tool_call.delta": [ToolCallStarted(index=0, id="call_1", name="lookup")],
    "tool_call.completed": [ToolCallStarted(index=0, id="call_1", name="lookup")],
}


def _meta(protocol: WireProtocol) -> StreamMeta:
    # The render options every registered protocol may read (include_usage shows usage).
    return StreamMeta(
        id="s1", model="default", protocol=protocol.name, created=1, render={"include_usage": True}
    )


def _rendered(protocol: WireProtocol, events: Sequence[Event]) -> list[list[Any]]:
    renderer = protocol.renderer(_meta(protocol))
    out = []
    for seq, event in enumerate(events):
        event.seq = seq
        payloads = []
        for payload in renderer.render(event):
            payloads.append(orjson.loads(payload) if isinstance(payload, bytes) else payload)
        out.append(payloads)
    return out


def test_every_event_type_has_a_sample() -> None:
    assert set(SAMPLES) | _STRUCTURAL == set(EVENT_TYPES)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_each_renderer_renders_or_declares_dropping_each_event_type(
    protocol: WireProtocol,
) -> None:
    renderer_type = type(protocol.renderer(_meta(protocol)))
    assert renderer_type.drops <= set(EVENT_TYPES), "drops names an unknown event type"
    for name, sample in SAMPLES.items():
        context = [StreamStarted(id="s1", model="default", created=1), *_CONTEXT.get(name, [])]
        without = _rendered(protocol, [*context, StreamCompleted()])
        with_it = _rendered(protocol, [*context, sample, StreamCompleted()])
        # Aligned by event: the sample's own payloads, and what it changes after it.
        unchanged = with_it == [*without[: len(context)], [], *without[len(context) :]]
        if name in renderer_type.drops:
            assert unchanged, f"{protocol.name} declares it drops {name} but renders it"
        else:
            assert not unchanged, f"{protocol.name} renders nothing for {name}: add it to drops"


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_each_renderer_ends_every_terminal_event_visibly(protocol: WireProtocol) -> None:
    for terminal in (
        StreamCompleted(),
        StreamCancelled(reason="stop"),
        StreamFailed(error={"type": "backend_error", "message": "gone", "code": None}),
    ):
        rendered = _rendered(protocol, [StreamStarted(id="s1", model="m", created=1), terminal])
        assert rendered[-1], f"{protocol.name} sends nothing for {terminal.type}"


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_each_protocol_names_streams_and_answers_errors_in_its_shape(
    protocol: WireProtocol,
) -> None:
    assert protocol.stream_id(protocol.public_id("abc")) == "abc"
    body = protocol.error_body(StreamNotFound("No stream with id 'x'."))
    orjson.dumps(body)  # JSON-able
    assert "No stream with id 'x'." in orjson.dumps(body).decode()
    assert protocol.routes(), "a protocol with no routes is unreachable"


def test_registry_names_are_unique() -> None:
    names = [protocol.name for protocol in PROTOCOLS]
    assert len(names) == len(set(names))


# -- a protocol is its module plus a registry line -------------------------------------------


class ToyBody(BaseModel):
    prompt: str
    chat: str


class ToyRenderer(Renderer):
    drops = frozenset(set(EVENT_TYPES) - {"text.delta", *_STRUCTURAL})

    def render(self, event: Event) -> list[Payload]:
        if isinstance(event, TextDelta):
            return [{"t": event.text}]
        if event.terminal:
            return [{"end": event.type}, "[DONE]"]
        return []


class Toy(WireProtocol):
    """A wire that streams ``{"t": …}`` frames, resumes and stops by its own chat id."""

    name = "toy"
    id_prefix = "toy_"
    stream_headers: ClassVar[Mapping[str, str]] = {"x-toy-stream": "v1"}
    error_schema: ClassVar[Mapping[str, Any]] = {"type": "object", "required": ["toy_error"]}
    request_model = ToyBody

    def routes(self) -> tuple[Endpoint, ...]:
        return (
            Endpoint(
                path="/toy/chat",
                method="POST",
                handler=self.chat,
                operation_id="toyChat",
                body=ToyBody,
            ),
            Endpoint(path="/toy/chat/{chat}/stream", method="GET", handler=self.resume),
            Endpoint(path="/toy/chat/{chat}/stop", method="POST", handler=self.stop),
        )

    def parse(self, body: Any) -> Parsed:
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise InvalidRequest("prompt is required", param="prompt")
        request = ChatRequest(
            model="default",
            messages=[Message(role="user", content=body["prompt"])],
            sampling=SamplingParams(max_tokens=6, temperature=0.0),
        )
        return Parsed(request=request, stream=True, render={"chat": body.get("chat")})

    def renderer(self, meta: StreamMeta) -> ToyRenderer:
        return ToyRenderer(meta)

    def error_body(self, exc: TokenwireError) -> dict[str, Any]:
        return {"toy_error": exc.message, "status": exc.status_code}

    async def chat(self, ctx: Context, request: Request) -> Reply:
        parsed = self.parse(await ctx.read_json(request))
        meta = await ctx.start(self, parsed, request)
        await ctx.name_stream(request, f"toy:{parsed.render['chat']}", meta.id)
        return ctx.event_stream(meta)

    async def resume(self, ctx: Context, request: Request) -> Reply:
        chat = f"toy:{request.path_params['chat']}"
        stream_id = await ctx.named_stream(request, chat, running=False)
        if stream_id is None:
            return Response(status_code=204)
        return await ctx.resume(request, stream_id)

    async def stop(self, ctx: Context, request: Request) -> Reply:
        chat = f"toy:{request.path_params['chat']}"
        stream_id = await ctx.named_stream(request, chat, running=False)
        if stream_id is None:
            raise StreamNotFound("no such chat")
        await ctx.owned_meta(request, stream_id)
        await ctx.cancel(stream_id)
        return JSONResponse({"id": self.public_id(stream_id), "stopped": True})


KEY = "toy-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def toy_server() -> Iterator[str]:
    port = free_port()
    app = create_app(
        Settings(port=port, api_keys=[KEY], disconnect_grace=0), protocols=(*PROTOCOLS, Toy())
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=HttpProtocol, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/healthz", None, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _data(response: httpx.Response) -> list[Any]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else orjson.loads(line) for line in lines]


@pytest.mark.timeout(180)
def test_a_toy_protocol_gets_routes_errors_headers_and_names_from_the_registry(
    toy_server: str,
) -> None:
    with httpx.Client(base_url=toy_server, headers=AUTH, timeout=60) as http:
        answer = http.post("/toy/chat", json={"prompt": "Say hi.", "chat": "c1"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-toy-stream"] == "v1" and answer.headers["x-stream-id"]
        frames = _data(answer)
        assert frames[-2:] == [{"end": "stream.completed"}, "[DONE]"]
        assert any("t" in frame for frame in frames[:-2])

        # Its own GET: the chat's stream again, by the wire's own name; 204 for none.
        again = http.get("/toy/chat/c1/stream")
        assert again.status_code == 200 and _data(again) == frames
        assert http.get("/toy/chat/nobody/stream").status_code == 204
        stop = http.post("/toy/chat/c1/stop")
        assert stop.json() == {"id": "toy_" + answer.headers["x-stream-id"], "stopped": True}

        # Errors in its shape: a handler's, a wrong method's, the auth gate's.
        bad = http.post("/toy/chat", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["status"] == 400, bad.text
        assert "toy_error" in bad.json()
        assert http.post("/toy/chat", json={"chat": "c2"}).json()["toy_error"]
        wrong = http.delete("/toy/chat")
        assert wrong.status_code == 405 and "toy_error" in wrong.json()
        unauthenticated = httpx.post(f"{toy_server}/toy/chat", json={}, timeout=10)
        assert unauthenticated.status_code == 401 and "toy_error" in unauthenticated.json()
        # ... while the registry's protocols keep theirs.
        missing = httpx.post(f"{toy_server}/v1/chat/completions", json={}, timeout=10)
        assert missing.status_code == 401 and "error" in missing.json()

        document = http.get("/openapi.json").json()
        operation = document["paths"]["/toy/chat"]["post"]
        assert operation["operationId"] == "toyChat"
        assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ToyError"
        }
        assert "/v1/chat/completions" in document["paths"]
