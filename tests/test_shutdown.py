"""Graceful shutdown of a real ``tokenwire serve`` on SIGTERM (server/shutdown.py).

In-flight streams that finish within ``--drain-timeout`` finish normally; the rest end with
``stream.cancelled`` (reason ``shutdown``) rendered as their protocol's terminal frame; new
connections are refused at once; with the Redis journal, everything is flushed: another
replica replays the whole stream, terminal event included.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fault_upstream import RunningFault, fault_upstream

from .conftest import tokenwire_server
from .e2e.services import redis_server
from .gateway_support import SSE, iter_sse

pytestmark = pytest.mark.e2e

DRAIN = 3.0


@pytest.fixture(scope="module")
def fault() -> Iterator[RunningFault]:
    with fault_upstream() as running:
        yield running


class Reader(threading.Thread):
    """Reads one streaming response to its end in the background."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[SSE] = []
        self.raw_end = b""
        self.headers: httpx.Headers | None = None
        self.first = threading.Event()
        self.error: BaseException | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as response:
                self.headers = response.headers
                for sse in iter_sse(response):
                    self.events.append(sse)
                    self.first.set()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


def chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def start(url: str, body: dict[str, Any]) -> Reader:
    reader = Reader(url, body)
    reader.start()
    assert reader.first.wait(60), "no first event"
    assert reader.error is None, reader.error
    return reader


def test_sigterm_drains_then_cancels_with_a_clean_terminal_frame(fault: RunningFault) -> None:
    with tokenwire_server(
        "--upstream", f"fault={fault.url}",
        "--drain-timeout", str(DRAIN),
        "--disconnect-grace", "30",
        "--heartbeat", "1",
    ) as server:  # fmt: skip
        url = server.url
        # Finishes well within the drain: 8 tokens 0.1 s apart.
        short = start(f"{url}/v1/streams", chat("trickle", "n=8 gap=0.1"))
        # Would run for a minute: cut by the drain timeout, in both protocols.
        long_native = start(f"{url}/v1/streams", chat("trickle", "n=600 gap=0.1"))
        long_openai = start(
            f"{url}/v1/chat/completions", chat("trickle", "n=600 gap=0.1", stream=True)
        )
        long_anthropic = start(
            f"{url}/v1/messages",
            {**chat("trickle", "n=600 gap=0.1"), "max_tokens": 1000, "stream": True},
        )
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 2):
            pass  # stopped accepting at once
        for reader in (short, long_native, long_openai, long_anthropic):
            reader.join(DRAIN + 15)
            assert not reader.is_alive()
            assert reader.error is None, reader.error
        server.process.wait(timeout=20)

    native = [e.json() for e in short.events]
    assert native[-1]["type"] == "stream.completed"
    assert "".join(e.get("text", "") for e in native) == "abcdefgh"  # all of it, not cut

    events = [e.json() for e in long_native.events]
    terminals = [e for e in events if e["type"] in ("stream.completed", "stream.cancelled",
                                                    "stream.failed")]  # fmt: skip
    assert terminals == [events[-1]] and events[-1]["type"] == "stream.cancelled"
    assert events[-1]["reason"] == "shutdown"
    assert [e["seq"] for e in events] == list(range(len(events)))  # nothing skipped
    # Cut by the drain timeout, not at once and not by uvicorn's later hard stop.
    assert DRAIN - 0.5 <= long_native.ended_at - sent <= DRAIN + 8

    frames = long_openai.events
    assert frames[-1].data == "[DONE]"
    assert frames[-2].json()["choices"][0]["finish_reason"] == "stop"
    assert DRAIN - 0.5 <= long_openai.ended_at - sent <= DRAIN + 8

    messages = [e.json() for e in long_anthropic.events]
    assert messages[-1]["type"] == "message_stop"
    assert messages[-2]["type"] == "message_delta"
    assert DRAIN - 0.5 <= long_anthropic.ended_at - sent <= DRAIN + 8


def test_sigterm_flushes_the_redis_journal(fault: RunningFault) -> None:
    with redis_server() as redis:
        journal = ("--journal", redis.url)
        with tokenwire_server(
            "--upstream", f"fault={fault.url}", "--no-embedded", *journal,
            "--drain-timeout", "1", "--disconnect-grace", "30",
        ) as other:  # fmt: skip
            with tokenwire_server(
                "--upstream", f"fault={fault.url}", "--no-embedded", *journal,
                "--drain-timeout", "1", "--disconnect-grace", "30",
            ) as server:  # fmt: skip
                reader = start(f"{server.url}/v1/streams", chat("trickle", "n=600 gap=0.02"))
                time.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                reader.join(20)
                server.process.wait(timeout=20)
                assert reader.headers is not None
                stream_id = reader.headers["x-stream-id"]
            seen = [e.json() for e in reader.events]
            assert seen[-1]["type"] == "stream.cancelled" and seen[-1]["reason"] == "shutdown"
            # The other replica replays exactly what the client saw: nothing was lost.
            replay = httpx.get(f"{other.url}/v1/streams/{stream_id}", timeout=30)
            assert replay.status_code == 200
            replayed = [
                line[5:].strip() for line in replay.text.splitlines() if line.startswith("data:")
            ]
            assert replayed == [e.data for e in reader.events]
