"""The AI SDK's UI message stream (``useChat``'s backend), tested with the SDK itself.

Every scenario runs the real ``AbstractChat`` + ``DefaultChatTransport`` (ai@6 and ai@7, and
ai@7's ``WebSocketChatTransport``) in Node against a server on the embedded model; every
chunk the server sent is checked against the SDK's own ``uiMessageChunkSchema`` and the
fields it declares (tests/node/uichat.mjs). Two replicas behind nginx:
tests/e2e/test_ui_chat_replicas.py.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

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
from tokenwire.protocols.ui_message_stream import PROTOCOL, Renderer

from .conftest import RunningServer, tokenwire_server
from .scripted import ScriptedBackend, serve_app_in_thread
from .uichat_support import SDKS, assistant_messages, chunks, kinds, run_chat, text_of

pytestmark = pytest.mark.timeout(300)

#: Long enough that a reload lands mid-answer, short enough to keep the file quick.
STORY = "Write a long story about a dragon who learns to sing."
SEEDED = {"temperature": 0.9, "seed": 11, "maxOutputTokens": 120}
_ids = itertools.count()


def chat_id(label: str) -> str:
    return f"{label}-{next(_ids)}"


@pytest.fixture(scope="module")
def ui_server() -> Iterator[RunningServer]:
    with tokenwire_server("--threads", "1", "--heartbeat", "1", "--disconnect-grace", "30") as s:
        yield s


@pytest.fixture(scope="module")
def edge_server() -> Iterator[RunningServer]:
    """Server-side tools, and a stream size limit that fails long answers mid-stream."""
    with tokenwire_server(
        "--threads", "1",
        "--tools", "tests.tool_fixtures:tools",
        "--max-tool-steps", "1",
        "--max-stream-bytes", "4000",
    ) as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def reference(ui_server: RunningServer) -> str:
    """The seeded answer to STORY, uninterrupted (the same whatever client reads it)."""
    result = run_chat("ai6", "full", api=api(ui_server), id=chat_id("ref"), text=STORY, body=SEEDED)
    assert result["chat"]["status"] == "ready" and result["text"]
    text: str = result["text"]
    return text


def api(server: RunningServer) -> str:
    return f"{server.url}/api/chat"


def metric(server: RunningServer, prefix: str) -> float:
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the renderer against the SDK's schemas (no model) ---------------------------------------


def render_all(events: list[Event], version: int = 6) -> list[str]:
    meta = StreamMeta(
        id="s1", model="m", protocol=PROTOCOL.name, created=0, render={"version": version}
    )
    renderer = Renderer(meta)
    out: list[str] = []
    for seq, event in enumerate(events):
        event.seq = seq
        for payload in renderer.render(event):
            if isinstance(payload, bytes):
                out.append(payload.decode())
            elif isinstance(payload, str):
                out.append(payload)
            else:
                out.append(json.dumps(payload, separators=(",", ":")))
    return out


EVERY_KIND: list[Event] = [
    StreamStarted(id="s1", model="m", created=0),
    Progress(stage="queued", message="waiting", position=2),
    TextDelta(text='He said "hi"\n'),
    ToolCallStarted(index=0, id="call_1", name="lookup"),
    ToolCallDelta(index=0, arguments_delta='{"q": '),
    ToolCallDelta(index=0, arguments_delta='"x"}'),
    ToolCallCompleted(index=0, id="call_1", name="lookup", arguments='{"q": "x"}'),
    ToolResult(id="call_2", name="get_weather", arguments='{"city": "Rome"}', output='{"t": 21}'),
    ToolResult(id="call_3", name="get_weather", arguments="{}", output="boom", error=True),
    TextDelta(text="after the tools"),
    GuardTriggered(guard="pii", match="123", position=4),
    Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=1),
    StreamCompleted(finish_reason="content_filter"),
]


@pytest.mark.parametrize("sdk", ["ai5", "ai6", "ai7"])
def test_every_chunk_kind_conforms_to_the_sdk_schema(sdk: str) -> None:
    version = 5 if sdk == "ai5" else 6
    payloads = render_all(list(EVERY_KIND), version)
    payloads += render_all([StreamStarted(id="s", model="m", created=0), TextDelta(text="a"),
                            StreamCancelled(reason="stop")], version)  # fmt: skip
    payloads += render_all([StreamStarted(id="s", model="m", created=0), TextDelta(text="a"),
                            StreamFailed(error={"message": "boom"})], version)  # fmt: skip
    run_chat(sdk, "validate", payloads=payloads)  # asserts no conformance problem


def test_ai5_rejects_the_v6_chunk_set_so_the_version_setting_matters() -> None:
    payloads = render_all(
        [StreamStarted(id="s", model="m", created=0), StreamCompleted(finish_reason="stop")], 6
    )
    with pytest.raises(AssertionError, match="finishReason not declared"):
        run_chat("ai5", "validate", payloads=payloads)


def test_ai5_reads_the_v5_chunk_set_and_throws_on_the_v6_one(ui_server: RunningServer) -> None:
    """ai@5.0's own client, end to end: fine with uiMessageStreamVersion 5; the default (6)
    sends finish.finishReason, which its strict schema rejects."""
    body = {"maxOutputTokens": 12, "seed": 1}
    ok = run_chat("ai5", "full", api=api(ui_server), id=chat_id("v5"), text="Say hi.",
                  body={**body, "uiMessageStreamVersion": 5})  # fmt: skip
    assert ok["chat"]["status"] == "ready" and ok["chat"]["error"] is None and ok["text"]
    bad = run_chat("ai5", "full", api=api(ui_server), id=chat_id("v6"), text="Say hi.",
                   body=body, check=False)  # fmt: skip
    assert bad["chat"]["status"] == "error" and "finishReason" in bad["chat"]["error"]


def test_text_blocks_and_tool_steps_are_well_formed() -> None:
    got = [json.loads(p) if p != "[DONE]" else p for p in render_all(list(EVERY_KIND))]
    kinds_ = [c if isinstance(c, str) else c["type"] for c in got]
    assert kinds_ == [
        "start", "start-step", "data-progress",
        "text-start", "text-delta", "text-end",
        "tool-input-start", "tool-input-delta", "tool-input-delta", "tool-input-available",
        "tool-input-start", "tool-input-available", "tool-output-available",
        "tool-input-start", "tool-input-available", "tool-output-error",
        "finish-step", "start-step",
        "text-start", "text-delta", "text-end", "data-guard",
        "finish-step", "finish", "[DONE]",
    ]  # fmt: skip
    starts = [c for c in got if isinstance(c, dict) and c["type"] == "text-start"]
    assert len({c["id"] for c in starts}) == 2  # a new block after the tools
    assert got[0] == {"type": "start", "messageId": "msg-s1"}
    finish = got[-2]
    assert isinstance(finish, dict)
    assert finish["finishReason"] == "content-filter"
    assert finish["messageMetadata"]["usage"]["outputTokens"] == 4


def test_a_stream_taken_over_by_another_replica_is_still_one_message() -> None:
    """A second stream.started (a replica claimed the stream and goes on) opens nothing."""
    got = render_all(
        [
            StreamStarted(id="s1", model="m", created=0),
            TextDelta(text="a"),
            StreamStarted(id="s1", model="m", created=0),
            TextDelta(text="b"),
            StreamCompleted(),
        ]
    )
    types = [p if p == "[DONE]" else json.loads(p)["type"] for p in got]
    assert types == ["start", "start-step", "text-start", "text-delta", "text-delta",
                     "text-end", "finish-step", "finish", "[DONE]"]  # fmt: skip


def test_ui_messages_with_tool_parts_become_the_conversation_the_model_had() -> None:
    parsed = PROTOCOL.parse(
        {
            "id": "c",
            "system": "Be brief.",
            "messages": [
                {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Weather?"}]},
                {"id": "a1", "role": "assistant", "parts": [
                    {"type": "step-start"},
                    {"type": "tool-get_weather", "toolCallId": "c1", "state": "output-available",
                     "input": {"city": "Rome"}, "output": {"sky": "sunny"}},
                    {"type": "step-start"},
                    {"type": "text", "text": "Sunny."},
                    {"type": "reasoning", "text": "ignored"},
                ]},
                {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "Thanks"},
                                                        {"type": "file", "url": "x"}]},
            ],
            "temperature": 0.2, "seed": 7, "maxOutputTokens": 9, "toolChoice": "none",
            "somethingElse": True,
        }
    )  # fmt: skip
    request = parsed.request
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "Weather?"),
        ("assistant", ""),
        ("tool", '{"sky":"sunny"}'),
        ("assistant", "Sunny."),
        ("user", "Thanks"),
    ]
    call = request.messages[2].tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "c1",
        "get_weather",
        {"city": "Rome"},
    )
    assert request.messages[3].tool_call_id == "c1"
    assert (request.sampling.temperature, request.sampling.seed) == (0.2, 7)
    assert request.sampling.max_tokens == 9 and request.tool_choice == "none"
    assert parsed.render == {"version": 6, "chat": "c"}


# -- the SDK's chat against the embedded model -----------------------------------------------


@pytest.mark.parametrize("sdk", SDKS)
def test_a_full_answer(ui_server: RunningServer, sdk: str) -> None:
    result = run_chat(sdk, "full", api=api(ui_server), id=chat_id("full"), text="Say hello.",
                      second="And goodbye?", body={"maxOutputTokens": 24, "seed": 1})  # fmt: skip
    chat = result["chat"]
    assert chat["status"] == "ready" and chat["error"] is None
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "user", "assistant"]
    first, second = assistant_messages(chat)
    assert text_of(first) and text_of(second) and first["id"] != second["id"]
    post = result["exchanges"][0]
    assert post["method"] == "POST" and post["status"] == 200
    assert post["headers"]["content-type"].startswith("text/event-stream")
    assert post["headers"]["x-vercel-ai-ui-message-stream"] == "v1"
    assert post["headers"]["x-accel-buffering"] == "no"
    assert post["headers"]["x-stream-id"]
    sent = json.loads(post["body"])  # what the SDK sends, as documented
    assert sent["id"] and sent["trigger"] == "submit-message"
    assert sent["messages"][0]["parts"] == [{"type": "text", "text": "Say hello."}]
    got = [k for k in kinds(post) if k != "data-progress"]  # prefill progress may come first
    assert got[:3] == ["start", "start-step", "text-start"]
    assert got[-4:] == ["text-end", "finish-step", "finish", "[DONE]"]
    assert chunks(post)[0] == {"type": "start", "messageId": first["id"]}
    assert all(e["id"] is not None for e in post["events"])  # the seq rides in id: lines
    assert chat["finishes"][-1]["finishReason"] in ("stop", "length")
    # the second request carried the first answer back as a UIMessage
    assert len(json.loads(result["exchanges"][1]["body"])["messages"]) == 3


@pytest.mark.parametrize("sdk", SDKS)
def test_reload_mid_answer_resumes_the_same_answer(
    ui_server: RunningServer, reference: str, sdk: str
) -> None:
    result = run_chat(sdk, "reload", api=api(ui_server), id=chat_id("reload"), text=STORY,
                      body=SEEDED, cutAfter=3)  # fmt: skip
    # the reload landed mid-answer: the first response was cut before its finish
    assert "finish" not in kinds(result["exchanges"][0])
    assert len(result["textAtCut"]) < len(reference)
    chat = result["chat"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    answers = assistant_messages(chat)
    assert len(answers) == 1  # the partial one was replaced, not duplicated
    assert text_of(answers[0]) == reference
    post, resume = result["exchanges"][0], result["exchanges"][-1]
    assert resume["method"] == "GET" and resume["url"].endswith("/stream")
    assert resume["status"] == 200
    assert chunks(resume)[0] == chunks(post)[0]  # the same start{messageId}
    assert kinds(resume)[-1] == "[DONE]"


@pytest.mark.parametrize("sdk", SDKS)
def test_stop_after_a_resume_stops_the_model(ui_server: RunningServer, sdk: str) -> None:
    body = {**SEEDED, "maxOutputTokens": 600}
    result = run_chat(sdk, "stopAfterResume", api=api(ui_server), id=chat_id("stop"),
                      text=STORY, body=body, cutAfter=3, stopAfter=3)  # fmt: skip
    assert result["stop"]["status"] == 200 and result["stop"]["body"]["stopped"] is True
    assert result["textLater"] == result["textAtStop"]  # nothing reached the chat after Stop
    assert len(result["textAtStop"]) >= len(result["textAtCut"])
    assert result["afterStatus"] == 204 and result["afterBody"] == ""
    answers = assistant_messages(result["chat"])
    assert len(answers) == 1 and answers[0]["id"] == result["lastMessageId"]
    # the model stopped: the stream's log ends with abort, a few tokens past what the chat had
    stream_id = result["exchanges"][0]["headers"]["x-stream-id"]
    replay = httpx.get(f"{ui_server.url}/v1/streams/{stream_id}", timeout=30).text
    datas = [line[6:] for line in replay.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    assert json.loads(datas[-2]) == {"type": "abort", "reason": "stop"}
    logged = "".join(json.loads(d)["delta"] for d in datas if '"text-delta"' in d)
    assert logged.startswith(result["textAtStop"])
    assert len(logged) - len(result["textAtStop"]) < 200  # of up to 600 tokens


@pytest.mark.parametrize("sdk", SDKS)
def test_a_stale_stop_does_not_cancel_a_newer_answer(ui_server: RunningServer, sdk: str) -> None:
    result = run_chat(sdk, "staleStop", api=api(ui_server), id=chat_id("stale"),
                      text="Say hi.", second=STORY,
                      body={"maxOutputTokens": 48, "seed": 3, "temperature": 0.9})  # fmt: skip
    assert result["stale"]["status"] == 200
    assert result["stale"]["body"]["stopped"] is False
    chat = result["chat"]
    assert chat["status"] == "ready" and chat["error"] is None
    last = result["exchanges"][-1]
    assert "abort" not in kinds(last) and kinds(last)[-2:] == ["finish", "[DONE]"]
    assert chat["finishes"][-1]["isAbort"] is False


@pytest.mark.parametrize("sdk", SDKS)
def test_resume_with_nothing_running_is_a_cheap_204(ui_server: RunningServer, sdk: str) -> None:
    before = metric(ui_server, "tokenwire_journal_streams")
    result = run_chat(sdk, "resumeNothing", api=api(ui_server), id=chat_id("none"))
    (exchange,) = result["exchanges"]
    assert exchange["status"] == 204 and exchange["text"] == ""
    assert result["chat"]["status"] == "ready" and result["chat"]["messages"] == []
    assert metric(ui_server, "tokenwire_journal_streams") == before  # no stream, no model work


def test_a_second_post_while_streaming_is_409(ui_server: RunningServer) -> None:
    chat = chat_id("busy")
    body = {"id": chat, "messages": [{"id": "u1", "role": "user",
                                      "parts": [{"type": "text", "text": STORY}]}],
            "maxOutputTokens": 400}  # fmt: skip
    with httpx.stream("POST", api(ui_server), json=body, timeout=60) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)
        second = httpx.post(api(ui_server), json=body, timeout=60)
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "chat_busy"
        stopped = httpx.delete(f"{api(ui_server)}/{chat}/stream", timeout=30)
        assert stopped.json()["stopped"] is True
        tail = [line for line in lines if line.startswith("data:")]
    assert tail[-2:] == ['data: {"type":"abort","reason":"stop"}', "data: [DONE]"]
    assert httpx.get(f"{api(ui_server)}/{chat}/stream", timeout=30).status_code == 204


def test_bad_bodies_are_clear_400s(ui_server: RunningServer) -> None:
    for body, param in [
        ({"messages": []}, "id"),
        ({"id": "x"}, "messages"),
        ({"id": "x", "messages": [{"role": "robot", "parts": []}]}, "messages.0.role"),
        ({"id": "x", "messages": [], "uiMessageStreamVersion": 9}, "uiMessageStreamVersion"),
    ]:
        response = httpx.post(api(ui_server), json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert param in response.json()["error"]["message"]


def test_the_server_keeps_the_conversation_for_the_one_message_form(
    ui_server: RunningServer,
) -> None:
    chat = chat_id("keep")

    def ask(message_id: str, text: str) -> list[dict[str, Any]]:
        body = {"id": chat, "message": {"id": message_id, "role": "user",
                                        "parts": [{"type": "text", "text": text}]},
                "maxOutputTokens": 16, "seed": 1}  # fmt: skip
        with httpx.stream("POST", api(ui_server), json=body, timeout=60) as response:
            assert response.status_code == 200, response.read()
            return [json.loads(line[6:]) for line in response.iter_lines()
                    if line.startswith("data: {")]  # fmt: skip

    first = ask("u1", "My name is Ada.")
    second = ask("u2", "What is my name?")
    assert first[-1]["type"] == "finish" and second[-1]["type"] == "finish"
    # the second prompt held the first exchange: more prompt tokens than the first one
    before = first[-1]["messageMetadata"]["usage"]["inputTokens"]
    after = second[-1]["messageMetadata"]["usage"]["inputTokens"]
    answer = "".join(c["delta"] for c in first if c["type"] == "text-delta")
    assert after > before + len(answer) // 8


def test_the_path_and_the_default_chunk_set_are_settings() -> None:
    """``--ui-chat-path`` moves every route; ``--ui-chat-version 5`` drops finishReason."""
    backend = ScriptedBackend(pieces=["Hi", "!"])
    with serve_app_in_thread(backend, ui_chat_path="/v2/talk", ui_chat_version=5) as url:
        part = {"type": "text", "text": "hello"}
        body = {"id": "c1", "messages": [{"id": "u", "role": "user", "parts": [part]}]}
        answer = httpx.post(f"{url}/v2/talk", json=body, timeout=30)
        assert answer.status_code == 200
        finish = [json.loads(line[6:]) for line in answer.text.splitlines()
                  if line.startswith('data: {"type":"finish"')]  # fmt: skip
        assert finish == [{"type": "finish", "messageMetadata": finish[0]["messageMetadata"]}]
        assert httpx.get(f"{url}/v2/talk/c1/stream", timeout=30).status_code == 204
        assert httpx.post(f"{url}/api/chat", json=body, timeout=30).status_code == 404
        paths = httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
        assert "/v2/talk/{id}/stop" in paths and "/api/chat" not in paths


# -- ai@7's WebSocket transport --------------------------------------------------------------


def test_websocket_transport_send_resume_and_stop(ui_server: RunningServer, reference: str) -> None:
    ws = ui_server.url.replace("http://", "ws://") + "/api/chat"
    reload = run_chat("ai7", "reload", websocket=ws, api=api(ui_server), id=chat_id("ws"),
                      text=STORY, body=SEEDED, cutAfter=3)  # fmt: skip
    answers = assistant_messages(reload["chat"])
    assert len(answers) == 1 and text_of(answers[0]) == reference
    frames = [e["frame"]["type"] for x in reload["exchanges"] for e in x["events"] if "frame" in e]
    assert frames.count("end") == 1 and "chunk" in frames
    stop = run_chat("ai7", "stopAfterResume", websocket=ws, api=api(ui_server), id=chat_id("wss"),
                    text=STORY, body={**SEEDED, "maxOutputTokens": 600}, cutAfter=3,
                    stopAfter=3)  # fmt: skip
    assert stop["textLater"] == stop["textAtStop"]
    assert stop["afterStatus"] == 204


# -- tools and errors ------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", SDKS)
def test_the_tool_loop_shows_as_tool_parts(edge_server: RunningServer, sdk: str) -> None:
    result = run_chat(sdk, "full", api=api(edge_server), id=chat_id("tools"),
                      text="What is the weather in Rome?",
                      body={"toolChoice": "required", "seed": 2, "temperature": 0.3,
                            "maxOutputTokens": 30})  # fmt: skip
    chat = result["chat"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    (answer,) = assistant_messages(chat)
    types = [p["type"] for p in answer["parts"]]
    tool = next(p for p in answer["parts"] if p["type"] == "tool-get_weather")
    assert tool["state"] == "output-available"
    assert tool["input"]["city"] and tool["output"]["sky"] == "sunny"
    assert types.count("step-start") == 2  # the tool step, then the answer's
    assert types.index("tool-get_weather") < len(types) - 1 - types[::-1].index("step-start")
    assert text_of(answer)  # the final answer streamed after the tool
    sent = kinds(result["exchanges"][0])
    assert "data-progress" in sent  # the tool's progress, transient
    assert all(p["type"] != "data-progress" for p in answer["parts"])


@pytest.mark.parametrize("sdk", SDKS)
def test_an_error_mid_stream_keeps_the_partial_answer(edge_server: RunningServer, sdk: str) -> None:
    result = run_chat(sdk, "full", api=api(edge_server), id=chat_id("err"), text=STORY,
                      body={"toolChoice": "none", "maxOutputTokens": 800, "seed": 4,
                            "temperature": 0.9})  # fmt: skip
    chat = result["chat"]
    assert chat["status"] == "error"
    assert "4000" in chat["error"] or "large" in chat["error"]
    (answer,) = assistant_messages(chat)
    assert len(text_of(answer)) > 20  # the partial stays
    got = kinds(result["exchanges"][0])
    assert got[-3:] == ["text-end", "error", "[DONE]"]
