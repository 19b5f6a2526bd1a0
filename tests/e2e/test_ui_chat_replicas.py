"""``useChat`` against two replicas sharing Redis behind nginx: a reload resumes the answer on
the other replica, and Stop sent anywhere stops it. The client is the AI SDK itself
(tests/node/uichat.mjs, ai@6 and ai@7).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from ..conftest import RunningServer, tokenwire_server
from ..uichat_support import SDKS, assistant_messages, chunks, kinds, run_chat, text_of
from .services import Nginx, RedisServer, nginx, redis_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

STORY = "Write a long story about a dragon who learns to sing."
SEEDED = {"temperature": 0.9, "seed": 11, "maxOutputTokens": 120}
_ids = itertools.count()


@dataclass
class Cluster:
    redis: RedisServer
    a: RunningServer
    b: RunningServer
    nginx: Nginx


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    def args(redis: RedisServer) -> list[str]:
        return ["--journal", redis.url, "--threads", "1", "--heartbeat", "1"]

    with (
        redis_server() as redis,
        tokenwire_server(*args(redis)) as a,
        tokenwire_server(*args(redis)) as b,
        nginx([a.port, b.port]) as proxy,
    ):
        yield Cluster(redis, a, b, proxy)


def chat_id(label: str) -> str:
    return f"{label}-{next(_ids)}"


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> str:
    """The seeded answer to STORY, uninterrupted."""
    result = run_chat("ai6", "full", api=f"{cluster.a.url}/api/chat", id=chat_id("ref"),
                      text=STORY, body=SEEDED)  # fmt: skip
    text: str = result["text"]
    assert text
    return text


@pytest.mark.parametrize("sdk", SDKS)
def test_a_reload_resumes_on_the_other_replica(cluster: Cluster, reference: str, sdk: str) -> None:
    result = run_chat(sdk, "reload", api=f"{cluster.a.url}/api/chat",
                      resumeApi=f"{cluster.b.url}/api/chat", id=chat_id("reload"),
                      text=STORY, body=SEEDED, cutAfter=3)  # fmt: skip
    # the reload landed mid-answer: the first response was cut before its finish
    assert "finish" not in kinds(result["exchanges"][0])
    assert len(result["textAtCut"]) < len(reference)
    answers = assistant_messages(result["chat"])
    assert len(answers) == 1 and text_of(answers[0]) == reference
    post, resume = result["exchanges"][0], result["exchanges"][-1]
    assert resume["url"].startswith(cluster.b.url) and resume["status"] == 200
    assert chunks(resume)[0] == chunks(post)[0]
    # and through nginx, wherever round robin sends each request
    proxied = run_chat(sdk, "reload", api=f"{cluster.nginx.url}/api/chat", id=chat_id("ngx"),
                       text=STORY, body=SEEDED, cutAfter=3)  # fmt: skip
    answers = assistant_messages(proxied["chat"])
    assert len(answers) == 1 and text_of(answers[0]) == reference


@pytest.mark.parametrize("sdk", SDKS)
def test_stop_after_a_resume_on_the_other_replica(cluster: Cluster, sdk: str) -> None:
    chat = chat_id("stop")
    result = run_chat(sdk, "stopAfterResume", api=f"{cluster.nginx.url}/api/chat",
                      resumeApi=f"{cluster.b.url}/api/chat", id=chat, text=STORY,
                      body={**SEEDED, "maxOutputTokens": 600}, cutAfter=3,
                      stopAfter=3)  # fmt: skip
    assert result["stop"]["body"]["stopped"] is True
    assert result["textLater"] == result["textAtStop"]
    assert result["afterStatus"] == 204
    for server in (cluster.a, cluster.b):  # nothing runs for the chat on either replica
        gone = httpx.get(f"{server.url}/api/chat/{chat}/stream", timeout=30)
        assert gone.status_code == 204


def test_websocket_transport_resumes_and_stops_on_the_other_replica(
    cluster: Cluster, reference: str
) -> None:
    """ai@7's WebSocketChatTransport: the socket to replica A closes mid-answer (a reload), a
    new one to B resumes it; then the same with Stop by the abort frame, through nginx."""
    ws_a = cluster.a.url.replace("http://", "ws://") + "/api/chat"
    ws_b = cluster.b.url.replace("http://", "ws://") + "/api/chat"
    result = run_chat("ai7", "reload", websocket=ws_a, resumeWebsocket=ws_b,
                      api=f"{cluster.a.url}/api/chat", id=chat_id("ws"), text=STORY,
                      body=SEEDED, cutAfter=3)  # fmt: skip
    answers = assistant_messages(result["chat"])
    assert len(answers) == 1 and text_of(answers[0]) == reference
    assert result["exchanges"][-1]["url"].startswith(ws_b)
    ws_nginx = cluster.nginx.url.replace("http://", "ws://") + "/api/chat"
    stop = run_chat("ai7", "stopAfterResume", websocket=ws_a, resumeWebsocket=ws_nginx,
                    api=f"{cluster.nginx.url}/api/chat", id=chat_id("wss"), text=STORY,
                    body={**SEEDED, "maxOutputTokens": 600}, cutAfter=3,
                    stopAfter=3)  # fmt: skip
    assert stop["textLater"] == stop["textAtStop"]
    assert stop["afterStatus"] == 204


def test_a_second_post_on_the_other_replica_is_409(cluster: Cluster) -> None:
    chat = chat_id("busy")
    body = {"id": chat, "messages": [{"id": "u1", "role": "user",
                                      "parts": [{"type": "text", "text": STORY}]}],
            "maxOutputTokens": 400}  # fmt: skip
    with httpx.stream("POST", f"{cluster.a.url}/api/chat", json=body, timeout=60) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)
        assert httpx.post(f"{cluster.b.url}/api/chat", json=body, timeout=60).status_code == 409
        stop = httpx.post(f"{cluster.b.url}/api/chat/{chat}/stop", json={}, timeout=30)
        assert stop.json()["stopped"] is True
        tail = [line for line in lines if line.startswith("data:")]
    assert tail[-2:] == ['data: {"type":"abort","reason":"stop"}', "data: [DONE]"]
