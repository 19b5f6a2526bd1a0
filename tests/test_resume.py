"""Resume, Stop and the disconnect policy over HTTP/SSE on one server (in-memory journal),
with the real embedded model: replay after Last-Event-ID or ?after=N then live, in the
stream's own protocol; TTL eviction (410) and unknown ids (404); grace keeps generation
going, expiry of the grace cancels it; grace 0 cancels at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import RunningServer, tokenwire_server
from .sse_reader import TERMINAL, parse_frames, payload_of, read_segment, text_of

GRACE = 2.0
TTL = 4.0
COUNT = [{"role": "user", "content": "Count from 1 to 5000, separated by commas."}]
#: The embedded model counts on for well over 1000 tokens with these (greedy stops early).
LONG = {"model": "default", "messages": COUNT, "temperature": 0.9, "seed": 5}


@pytest.fixture(scope="module")
def resumable() -> Iterator[RunningServer]:
    with tokenwire_server(
        "--disconnect-grace", str(GRACE),
        "--stream-ttl", str(TTL),
        "--heartbeat", "1",
        "--threads", "1",
    ) as running:  # fmt: skip
        yield running


def test_openai_stream_resumes_in_its_own_format(resumable: RunningServer) -> None:
    body = {**LONG, "max_tokens": 60, "stream": True}
    with httpx.Client(base_url=resumable.url, timeout=60) as client:
        first = read_segment(client, "POST", "/v1/chat/completions", body=body, cut_after=700)
        stream_id = first.stream_id
        last = max(f.id for f in first.frames if f.id is not None)
        rest = read_segment(
            client, "GET", f"/v1/streams/{stream_id}", headers={"last-event-id": str(last)}
        )
        full = read_segment(client, "GET", f"/v1/streams/{stream_id}")
    assert rest.finished and full.finished
    chunks = [payload_of(f) for f in rest.frames[:-1]]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{stream_id}"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("role" not in c["choices"][0]["delta"] for c in chunks)  # not started again
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert rest.frames[-1].data == "[DONE]"
    assert next(f.id for f in rest.frames) > last
    joined = "".join(text_of(f) for f in first.frames + rest.frames)
    assert joined == "".join(text_of(f) for f in full.frames)
    assert [f.data for f in first.frames + rest.frames] == [f.data for f in full.frames]


def test_native_resume_with_after_during_and_after_generation(resumable: RunningServer) -> None:
    body = {**LONG, "max_tokens": 80}
    with httpx.Client(base_url=resumable.url, timeout=60) as client:
        first = read_segment(client, "POST", "/v1/streams", body=body, cut_after=500)
        stream_id = first.stream_id
        seen = [payload_of(f) for f in first.frames]
        assert seen[0]["type"] == "stream.started"
        # Two readers at once: one from where the first left off, one from the start.
        rest = read_segment(client, "GET", f"/v1/streams/{stream_id}?after={seen[-1]['seq']}")
        replay = read_segment(client, "GET", f"/v1/streams/{stream_id}?after=-1")
        tail = read_segment(client, "GET", f"/v1/streams/{stream_id}?after=70")
    rest_events = [payload_of(f) for f in rest.frames]
    assert [e["seq"] for e in seen + rest_events] == list(range(len(seen) + len(rest_events)))
    assert [f.event for f in rest.frames] == [e["type"] for e in rest_events]
    assert [payload_of(f) for f in replay.frames] == seen + rest_events
    assert [payload_of(f) for f in tail.frames] == [e for e in rest_events if e["seq"] > 70]


def test_resume_after_the_end_returns_at_once(resumable: RunningServer) -> None:
    with httpx.Client(base_url=resumable.url, timeout=60) as client:
        done = read_segment(client, "POST", "/v1/streams", body={**LONG, "max_tokens": 5})
        last = done.frames[-1].id
        started = time.monotonic()
        again = read_segment(
            client, "GET", f"/v1/streams/{done.stream_id}", headers={"last-event-id": str(last)}
        )
        assert again.frames == []
        assert time.monotonic() - started < 5


def test_unknown_ids_and_bad_positions_are_clear_errors(resumable: RunningServer) -> None:
    missing = httpx.get(f"{resumable.url}/v1/streams/no-such-stream", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "No stream with id 'no-such-stream'."
    bad = httpx.get(f"{resumable.url}/v1/streams/x?after=soon", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    assert httpx.get(f"{resumable.url}/v1/streams/x?after=-5", timeout=10).status_code == 400
    cancel = httpx.post(f"{resumable.url}/v1/streams/no-such-stream/cancel", timeout=10)
    assert cancel.status_code == 404


def test_finished_streams_expire_after_the_ttl(resumable: RunningServer) -> None:
    with httpx.Client(base_url=resumable.url, timeout=60) as client:
        done = read_segment(client, "POST", "/v1/streams", body={**LONG, "max_tokens": 3})
        assert done.finished
        ok = read_segment(client, "GET", f"/v1/streams/{done.stream_id}")
        assert ok.finished  # still there within the TTL
        time.sleep(TTL + 1.0)
        gone = client.get(f"/v1/streams/{done.stream_id}")
    assert gone.status_code == 410
    message = gone.json()["error"]["message"]
    assert "expired" in message and f"kept for {TTL:g}s" in message


def test_stop_from_a_second_connection_ends_every_reader(resumable: RunningServer) -> None:
    """A resumed reader (OpenAI format) and the original one both see the cancel."""
    body = {**LONG, "max_tokens": 3000, "stream": True}
    with (
        httpx.Client(base_url=resumable.url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as original,
    ):
        stream_id = original.headers["x-stream-id"]
        originals = original.iter_raw()
        next(originals)
        with client.stream("GET", f"/v1/streams/{stream_id}?after=-1") as second:
            buffer = b""
            frames = []
            stopped_at_text = None
            for chunk in second.iter_raw():
                new, buffer = parse_frames(buffer + chunk)
                frames += new
                texts = sum(1 for f in frames if text_of(f))
                if stopped_at_text is None and texts >= 8:
                    stop = client.post(f"/v1/streams/{stream_id}/cancel")
                    assert stop.json() == {
                        "id": stream_id,
                        "object": "stream.cancel",
                        "cancelled": True,
                    }
                    stopped_at_text = texts
                if frames and frames[-1].data == "[DONE]":
                    break
        # The original connection ends too, the same way.
        buffer = b""
        original_frames = []
        for chunk in originals:
            new, buffer = parse_frames(buffer + chunk)
            original_frames += new
            if original_frames and original_frames[-1].data == "[DONE]":
                break
    assert stopped_at_text is not None
    assert sum(1 for f in frames if text_of(f)) - stopped_at_text <= 5
    finish = payload_of(frames[-2])
    assert finish["choices"][0]["finish_reason"] == "stop"  # documented: cancelled -> stop
    assert original_frames[-1].data == "[DONE]"
    # Stop is idempotent.
    assert httpx.post(f"{resumable.url}/v1/streams/{stream_id}/cancel").status_code == 200
    # A later resume replays the same ending.
    with httpx.Client(base_url=resumable.url, timeout=30) as client:
        again = read_segment(client, "GET", f"/v1/streams/{stream_id}?after=-1")
    assert [f.data for f in again.frames[-2:]] == [f.data for f in frames[-2:]]


def _events(segment: Any) -> list[dict[str, Any]]:
    return [payload_of(f) for f in segment.frames]


def test_generation_goes_on_within_the_grace_and_stops_after(resumable: RunningServer) -> None:
    with httpx.Client(base_url=resumable.url, timeout=60) as client:
        first = read_segment(
            client, "POST", "/v1/streams", body={**LONG, "max_tokens": 3000}, cut_after=400
        )
        stream_id = first.stream_id
        last = _events(first)[-1]["seq"]
        time.sleep(GRACE / 2)  # nobody reads, within the grace
        mid = read_segment(client, "GET", f"/v1/streams/{stream_id}?after={last}", cut_after=4000)
        mid_events = _events(mid)
        assert mid_events[0]["seq"] == last + 1
        assert all(e["type"] not in TERMINAL for e in mid_events)
        # Events kept coming while no one was connected.
        assert mid_events[-1]["seq"] > last + 5
        dropped_at = time.monotonic()
        time.sleep(GRACE + 1.5)
        rest = read_segment(client, "GET", f"/v1/streams/{stream_id}?after={mid_events[-1]['seq']}")
    events = _events(rest)
    assert events[-1]["type"] == "stream.cancelled" and events[-1]["reason"] == "disconnect"
    assert rest.finished_at is not None and rest.finished_at - dropped_at < 60
    assert events[-1]["seq"] < 2000  # the grace ended it, not max_tokens


def test_grace_zero_stops_at_the_disconnect(server: RunningServer) -> None:
    """The shared fixture runs with --disconnect-grace 0."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first = read_segment(
            client, "POST", "/v1/streams", body={**LONG, "max_tokens": 3000}, cut_after=400
        )
        last = _events(first)[-1]["seq"]
        # Come back a little later: a resume that arrives before the server noticed the
        # drop is a reader, and rightly keeps the stream going.
        time.sleep(1.0)
        rest = read_segment(client, "GET", f"/v1/streams/{first.stream_id}?after={last}")
    events = _events(rest)
    assert events[-1]["type"] == "stream.cancelled", (len(events), events[-3:])
    assert events[-1]["reason"] == "disconnect"
    assert len([e for e in events if e["type"] == "text.delta"]) <= 5


@pytest.mark.anyio
async def test_a_reader_leaving_does_not_end_the_others() -> None:
    """Regression: readers share the journal's wake-up future; a cancelled reader used to
    cancel it for all, ending every other resumed reader of the stream silently."""
    import asyncio

    from tokenwire.events import StreamCompleted, TextDelta
    from tokenwire.journal import MemoryJournal, StreamMeta

    journal = MemoryJournal()
    await journal.create(StreamMeta(id="s", model="m", protocol="native", created=0))
    await journal.append("s", TextDelta(text="a"))

    async def read_all() -> list[int]:
        return [event.seq async for event in journal.read("s")]

    staying = asyncio.create_task(read_all())
    leaving = asyncio.create_task(read_all())
    await asyncio.sleep(0.01)  # both wait for the next event
    leaving.cancel()
    await asyncio.sleep(0.01)
    late = asyncio.create_task(read_all())  # joins after the cancel
    await asyncio.sleep(0.01)
    await journal.append("s", TextDelta(text="b"))
    await journal.append("s", StreamCompleted())
    assert await asyncio.wait_for(staying, 5) == [0, 1, 2]
    assert await asyncio.wait_for(late, 5) == [0, 1, 2]
