"""The client's incremental SSE decoder: any split of the byte stream gives the same events.

Properties are checked against a reference decoder written the obvious, non-incremental way
(whole text, split into lines with the spec's three line endings), so a bug that every split
shares is caught too.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire.client import ServerSentEvent, SSEDecoder


def reference_decode(data: bytes) -> tuple[list[ServerSentEvent], int | None, str]:
    text = data.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)
    # The last element is an unterminated line (or "" after a final terminator): not a line.
    lines = lines[:-1]
    events: list[ServerSentEvent] = []
    data_lines: list[str] = []
    kind = ""
    id_buffer = ""
    last_id = ""
    retry: int | None = None
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data_lines:
                events.append(ServerSentEvent("\n".join(data_lines), kind or "message", last_id))
            data_lines, kind = [], ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            value = value[1:] if value.startswith(" ") else value
        else:
            name, value = line, ""
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            kind = value
        elif name == "id" and "\0" not in value:
            id_buffer = value
        elif name == "retry" and re.fullmatch(r"[0-9]+", value):
            retry = int(value)
    return events, retry, last_id


def decode_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[ServerSentEvent], int | None, str]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events.extend(decoder.feed(data[start:cut]))
        start = cut
    return events, decoder.retry, decoder.last_event_id


_value = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=12,
)
_line = st.one_of(
    st.builds(lambda v: f"data: {v}", _value),
    st.builds(lambda v: f"data:{v}", _value),
    st.just("data"),
    st.builds(lambda v: f"event: {v}", _value),
    st.builds(lambda v: f"id: {v}", _value),
    st.sampled_from(["id: 7", "id", "id: a\0b", "id:12"]),
    st.builds(lambda n: f"retry: {n}", st.integers(0, 10_000)),
    st.sampled_from(["retry: 1x", "retry:", "retry: ١٢"]),  # not ASCII digits: ignored
    st.builds(lambda v: f": {v}", _value),  # comments, heartbeats
    st.builds(lambda v: f"{v}", _value),  # unknown fields, fields without a colon
    st.just(""),  # dispatch
)
_ending = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_line, _ending), max_size=30))
    body = "".join(line + ending for line, ending in lines)
    if draw(st.booleans()):
        body += draw(_line)  # an unterminated last line: never an event
    prefix = "\ufeff" if draw(st.booleans()) else ""
    return (prefix + body).encode("utf-8")


@settings(max_examples=400, deadline=None)
@given(data=sse_streams(), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_any_split_gives_the_same_events(data: bytes, cuts: list[int]) -> None:
    cuts = [c % (len(data) + 1) for c in cuts]
    assert decode_in_pieces(data, cuts) == reference_decode(data)


@settings(max_examples=150, deadline=None)
@given(data=sse_streams())
def test_one_byte_at_a_time_is_the_same_as_all_at_once(data: bytes) -> None:
    assert decode_in_pieces(data, list(range(len(data)))) == decode_in_pieces(data, [])


def test_crlf_split_between_chunks_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The LF pairs with the CR before it; the next CR LF is the blank line that dispatches.
    assert decoder.feed(b"\n\r\n") == [ServerSentEvent("a")]


def test_multibyte_character_cut_between_chunks() -> None:
    raw = "data: héllo ✓\n\n".encode()
    decoder = SSEDecoder()
    events = [event for i in range(len(raw)) for event in decoder.feed(raw[i : i + 1])]
    assert events == [ServerSentEvent("héllo ✓")]


def test_tokenwire_frames() -> None:
    raw = (
        b": stream open\n\nretry: 1000\n\nevent: text.delta\nid: 3\n"
        b'data: {"type":"text.delta","seq":3,"text":"Hi"}\n\n: ping\n\n'
    )
    decoder = SSEDecoder()
    assert decoder.feed(raw) == [
        ServerSentEvent('{"type":"text.delta","seq":3,"text":"Hi"}', "text.delta", "3")
    ]
    assert decoder.retry == 1000
    assert decoder.last_event_id == "3"
    assert decoder.comments == 2


def test_spec_details() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(
        b"\xef\xbb\xbfdata: one\ndata:two\ndata\n\n"  # BOM dropped; lines joined with LF
        b"id: 5\n\n"  # no data: not dispatched, but the id sticks
        b"data: x\n\n"
        b"id: bad\0id\ndata: y\n\n"  # an id with NUL is ignored
        b"retry: 12a\n"  # not digits: ignored
        b"data: incomplete\n"  # no blank line before EOF: discarded
    )
    assert events == [
        ServerSentEvent("one\ntwo\n"),
        ServerSentEvent("x", id="5"),
        ServerSentEvent("y", id="5"),
    ]
    assert decoder.retry is None
