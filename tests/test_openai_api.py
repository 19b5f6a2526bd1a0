"""The OpenAI-compatible API, streamed from the real embedded model over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from typing import Any

import httpx
import openai

from .conftest import RunningServer, tokenwire_server

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
#: A prompt the model answers at length, to hold the decode slot for a while.
LONG = [{"role": "user", "content": "Count from 1 to 300 without stopping: 1, 2, 3,"}]
#: A request that holds the decode slot for several seconds (greedy, so always long).
LONG_BODY = {"model": "default", "messages": LONG, "stream": True, "temperature": 0}


def sse_events(raw: str) -> list[dict[str, Any]]:
    """Parse an SSE body into its messages (fields per message; comments kept apart)."""
    out: list[dict[str, Any]] = []
    for block in raw.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line:
                continue
            if line.startswith(":"):
                fields.setdefault("comments", []).append(line[1:].strip())
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            out.append(fields)
    return out


def stream_raw(url: str, body: dict[str, Any], **kwargs: Any) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60, **kwargs) as r:
        text = "".join(r.iter_text())
    return r, text


# -- the official client -------------------------------------------------------------------


def test_official_client_streams_sync(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            max_tokens=24,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) >= 10  # token by token, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 24
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_official_client_streams_async(server: RunningServer) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
        stream = await client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            stream=True,
            max_tokens=16,  # type: ignore[arg-type]
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return pieces

    pieces = asyncio.run(asyncio.wait_for(run(), 60))
    assert sum(1 for p in pieces if p) >= 8


def test_official_client_non_streaming(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="default",
        messages=MESSAGES,
        max_tokens=12,  # type: ignore[arg-type]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 12


# -- wire format ---------------------------------------------------------------------------


def test_chunk_format_ids_headers_and_done(server: RunningServer) -> None:
    body = {
        "model": "default",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 8,
        "stream_options": {"include_usage": True},
    }
    response, raw = stream_raw(server.url, body, headers={"accept-encoding": "gzip, br"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers  # never compressed
    stream_id = response.headers["x-stream-id"]
    assert len(stream_id) >= 22  # 128 random bits, base64url

    messages = [m for m in sse_events(raw) if "data" in m]
    assert all("id" in m for m in messages)  # every SSE event carries id: <seq>
    ids = [int(m["id"]) for m in messages]
    assert ids == sorted(ids)
    assert messages[-1]["data"] == "[DONE]"
    chunks = [json.loads(m["data"]) for m in messages[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["id"] == f"chatcmpl-{stream_id}" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert "usage" not in chunks[0]


def test_without_include_usage_there_is_no_usage_chunk(server: RunningServer) -> None:
    body = {"model": "default", "messages": MESSAGES, "stream": True, "max_tokens": 4}
    _, raw = stream_raw(server.url, body)
    datas = [m["data"] for m in sse_events(raw) if "data" in m]
    assert datas[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in datas[:-1])


def test_tokens_arrive_progressively_not_in_one_burst(server: RunningServer) -> None:
    """Socket-level arrival times: the content chunks are spread over many reads."""
    body = {"model": "default", "messages": MESSAGES, "stream": True, "max_tokens": 48}
    arrivals: list[float] = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 24
    span = arrivals[-1] - arrivals[0]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Tokens come one by one as decoded: many distinct arrival instants, spread over the
    # generation rather than all at its end.
    assert sum(1 for g in gaps if g > 0.0005) >= len(gaps) // 2
    assert span > 0.01


def test_heartbeats_flow_while_a_stream_is_queued() -> None:
    """With one slot busy, a second stream gets headers, heartbeats and no content yet."""
    with tokenwire_server(
        "--heartbeat", "0.05", "--disconnect-grace", "0", "--parallel", "1"
    ) as srv:
        long_body = {
            "model": "default",
            "messages": LONG,
            "stream": True,
            "max_tokens": 600,
            "temperature": 0,
        }
        with httpx.stream(
            "POST", f"{srv.url}/v1/chat/completions", json=long_body, timeout=60
        ) as first:
            # The first stream holds the model; its line iterator stays referenced, since an
            # abandoned httpx iterator closes the connection (a disconnect, which frees it).
            first_lines = first.iter_lines()
            next(first_lines)
            with httpx.stream(
                "POST", f"{srv.url}/v1/streams", json=long_body, timeout=60
            ) as second:
                assert second.status_code == 200
                seen: list[str] = []
                started = time.monotonic()
                for line in second.iter_lines():
                    seen.append(line)
                    if line.startswith("data:") and '"stage":"queued"' in line:
                        assert '"position":1' in line
                    if sum(1 for s in seen if s == ": ping") >= 2:
                        break
                    assert time.monotonic() - started < 20
                assert any('"stage":"queued"' in s for s in seen)
                assert not any('"type":"text.delta"' in s for s in seen), seen
                assert next(first_lines) is not None  # still streaming: it held the model


# -- sampling ------------------------------------------------------------------------------


def generate(url: str, **params: Any) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="default",
        messages=MESSAGES,
        stream=True,
        **params,  # type: ignore[arg-type]
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_same_seed_same_text_and_other_seed_other_text(server: RunningServer) -> None:
    a = generate(server.url, seed=1234, temperature=1.0, max_tokens=40)
    b = generate(server.url, seed=1234, temperature=1.0, max_tokens=40)
    c = generate(server.url, seed=99, temperature=1.0, max_tokens=40)
    assert a == b
    assert a != c


def test_stop_sequence_split_across_tokens_never_reaches_the_client(
    server: RunningServer,
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    params: dict[str, Any] = {"seed": 7, "temperature": 0.8, "max_tokens": 40}
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            stream=True,
            **params,  # type: ignore[arg-type]
        )
        if c.choices
    ]
    pieces = [p for p in pieces if p]
    # A stop string that spans a token boundary: end of one token + start of the next.
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = "".join(pieces)
    expected = full[: full.index(stop)]
    stopped = client.chat.completions.create(
        model="default",
        messages=MESSAGES,
        stream=True,
        stop=[stop],
        **params,  # type: ignore[arg-type]
    )
    chunks = [c for c in stopped if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected
    assert stop not in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_temperature_zero_is_greedy_and_repeatable(server: RunningServer) -> None:
    assert generate(server.url, temperature=0, max_tokens=20) == generate(
        server.url, temperature=0, max_tokens=20
    )


def test_max_completion_tokens_limits_length(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="default",
        messages=MESSAGES,
        max_completion_tokens=5,  # type: ignore[arg-type]
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


# -- disconnect, concurrency, health -------------------------------------------------------


def test_disconnect_stops_decoding(server: RunningServer) -> None:
    """Close the socket after a few tokens; the stream ends cancelled soon after."""
    body = {
        "model": "default",
        "messages": LONG,
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0,
    }
    received = 0
    with httpx.stream("POST", f"{server.url}/v1/streams", json=body, timeout=60) as r:
        stream_id = r.headers["x-stream-id"]
        for line in r.iter_lines():
            if line.startswith("data:") and '"type":"text.delta"' in line:
                received += 1
                if received == 5:
                    break
    # The connection is closed now. Read the journal back: the stream was cancelled.
    deadline = time.monotonic() + 20
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        resumed = httpx.get(f"{server.url}/v1/streams/{stream_id}?after=-1", timeout=30)
        events = [json.loads(m["data"]) for m in sse_events(resumed.text) if "data" in m]
        if events and events[-1]["type"].startswith("stream."):
            break
    assert events[-1]["type"] == "stream.cancelled"
    assert events[-1]["reason"] == "disconnect"
    decoded = sum(1 for e in events if e["type"] == "text.delta")
    after_disconnect = decoded - received
    print(f"tokens decoded after the client disconnected: {after_disconnect}")
    assert after_disconnect < 50  # of 1500 requested: decoding stopped, not ran on


def test_four_concurrent_streams_all_complete(server: RunningServer) -> None:
    results: dict[int, tuple[str, str | None]] = {}

    def worker(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        text, finish = "", None
        for chunk in client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            stream=True,
            max_tokens=20,
            seed=i,
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        results[i] = (text, finish)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sorted(results) == [0, 1, 2, 3]
    for text, finish in results.values():
        assert text and finish in ("stop", "length")


def test_healthz_answers_while_a_long_generation_runs(server: RunningServer) -> None:
    body = {"model": "default", "messages": MESSAGES, "stream": True, "max_tokens": 200}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if '"content":"' in line and '"role"' not in line:
                break
        started = time.monotonic()
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        elapsed = time.monotonic() - started
        assert health.status_code == 200 and health.json()["active_streams"] >= 1
        assert elapsed < 2.0  # generous: the event loop is never blocked by decoding
        for _ in lines:
            pass


def test_full_queue_answers_429_with_retry_after() -> None:
    with tokenwire_server("--max-queue", "1", "--disconnect-grace", "0", "--parallel", "1") as srv:
        body = {
            "model": "default",
            "messages": LONG,
            "stream": True,
            "max_tokens": 600,
            "temperature": 0,
        }
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as a:
            a_lines = a.iter_lines()  # referenced: an abandoned iterator closes the stream
            next(a_lines)
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as b:
                assert b.status_code == 200  # queued, position 1
                refused = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=30)
                assert refused.status_code == 429
                assert int(refused.headers["retry-after"]) >= 1
                error = refused.json()["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
                assert next(a_lines) is not None


def test_models_lists_default_and_the_real_name(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "default"
    assert any("SmolLM2" in i for i in ids)
    real = next(i for i in ids if "SmolLM2" in i)
    assert (
        generate(server.url, max_tokens=3)
        and client.chat.completions.create(
            model=real,
            messages=MESSAGES,
            max_tokens=3,  # type: ignore[arg-type]
        )
        .choices[0]
        .message.content
    )


def test_a_raw_socket_client_sees_the_first_bytes_before_generation_ends(
    server: RunningServer,
) -> None:
    """Headers and the first chunk arrive long before the answer is complete."""
    body = json.dumps(
        {"model": "default", "messages": MESSAGES, "stream": True, "max_tokens": 120}
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        reads: list[tuple[float, bytes]] = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            reads.append((time.monotonic(), data))
            if b"[DONE]" in data:
                break
    first_content = next(t for t, d in reads if b'"content":"' in d and b'"role"' not in d)
    done = reads[-1][0]
    assert len(reads) > 20
    assert done - first_content > 0.05


def test_the_next_turn_reports_its_cached_prompt_tokens(server: RunningServer) -> None:
    """The embedded model keeps a finished conversation's KV cache: the next turn's usage
    says how many prompt tokens it reused, in OpenAI's ``prompt_tokens_details``."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    system = {"role": "system", "content": "You are a lighthouse keeper. " * 10}
    turn = [system, {"role": "user", "content": "What do you see tonight?"}]

    def usage_of(messages: list[dict[str, str]]) -> Any:
        chunks = list(
            client.chat.completions.create(
                model="default",
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                max_tokens=8,
                temperature=0,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage

    answer, first = usage_of(turn)
    follow_up = [
        *turn,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And?"},
    ]
    _, second = usage_of(follow_up)
    assert second.prompt_tokens > first.prompt_tokens
    assert second.prompt_tokens_details is not None
    assert first.prompt_tokens - 4 <= second.prompt_tokens_details.cached_tokens
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens
