"""The incremental JSON parser: property tests against ``json.loads``."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenwire.jsonstream import JsonStreamError, PartialJsonParser, format_path

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def documents(draw: st.DrawFn) -> str:
    value = draw(values)
    indent = draw(st.sampled_from([None, 0, 2]))
    separators = draw(st.sampled_from([None, (",", ":"), (" , ", " : ")]))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=indent, separators=separators)
    return draw(st.sampled_from(["", " ", "\n\t "])) + text + draw(st.sampled_from(["", " \n"]))


@st.composite
def splits(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def consistent(partial: Any, final: Any) -> bool:
    """``partial`` could grow into ``final`` (the parser's partial-value promise)."""
    if isinstance(partial, dict):
        if not isinstance(final, dict) or not set(partial) <= set(final):
            return False
        order = [key for key in final if key in partial]
        return list(partial) == order and all(consistent(partial[k], final[k]) for k in partial)
    if isinstance(partial, list):
        return (
            isinstance(final, list)
            and len(partial) <= len(final)
            and all(consistent(p, f) for p, f in zip(partial, final, strict=False))
        )
    if isinstance(partial, str):
        return isinstance(final, str) and final.startswith(partial)
    return type(partial) is type(final) and partial == final


def parse_in_pieces(pieces: list[str]) -> tuple[Any, list[Any]]:
    parser = PartialJsonParser()
    partials = []
    for piece in pieces:
        parser.feed(piece)
        if parser.has_value:
            partials.append(parser.value)
    return parser.close(), partials


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_gives_json_loads_value_and_consistent_partials(data: st.DataObject) -> None:
    text = data.draw(documents())
    pieces = data.draw(splits(text))
    final, partials = parse_in_pieces(pieces)
    expected = json.loads(text)
    assert final == expected
    assert type(final) is type(expected)
    for partial in partials:
        assert consistent(partial, expected), (partial, expected)


@settings(max_examples=200)
@given(data=st.data())
def test_partials_grow_monotonically_char_by_char(data: st.DataObject) -> None:
    text = data.draw(documents())
    parser = PartialJsonParser()
    previous: Any = None
    for char in text:
        parser.feed(char)
        if not parser.has_value:
            continue
        current = parser.value
        if previous is not None:
            # Each snapshot is consistent with every later one, not only the final one.
            assert consistent(previous, current), (previous, current)
        previous = current
    assert parser.close() == json.loads(text)


escape_pieces = st.sampled_from(
    [
        "a",
        "é",
        "\\n",
        "\\\\",
        '\\"',
        "\\/",
        "\\u0041",
        "\\ud83d",
        "\\ude00",
        "\\udbff\\udfff",
        "\\b",
    ]
)


@settings(max_examples=200)
@given(data=st.data())
def test_escapes_and_surrogates_match_json_loads(data: st.DataObject) -> None:
    body = "".join(data.draw(st.lists(escape_pieces, max_size=10)))
    text = f'["{body}", {{"{body}": "{body}"}}]'
    pieces = data.draw(splits(text))
    final, partials = parse_in_pieces(pieces)
    expected = json.loads(text)
    assert final == expected
    for partial in partials:
        assert consistent(partial, expected)


@settings(max_examples=200)
@given(data=st.data())
def test_invalid_character_raises_exactly_where_it_is(data: st.DataObject) -> None:
    text = data.draw(documents())
    at = data.draw(st.integers(0, len(text)))
    bad = text[:at] + "\x01" + text[at:]  # a raw control character is invalid anywhere
    parser = PartialJsonParser()
    with pytest.raises(JsonStreamError) as caught:
        for piece in data.draw(splits(bad)):
            parser.feed(piece)
    assert caught.value.position == at


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("[1,]", 3),
        ('{"a" 1}', 5),
        ("01", 1),
        ("-a", 1),
        ("1.e5", 2),
        ("nul!", 3),
        ("{}x", 2),
        ('{"a":1,}', 7),
        ('"\\x"', 2),
        ('"\\u12g4"', 5),
        ("[1 2]", 3),
        ('{"a":1]', 6),
        ("[}", 1),
        ("+1", 0),
    ],
)
def test_known_errors_point_at_the_first_bad_character(text: str, position: int) -> None:
    parser = PartialJsonParser()
    with pytest.raises(JsonStreamError) as caught:
        for char in text:
            parser.feed(char)
    assert caught.value.position == position
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_incomplete_document_raises_on_close() -> None:
    parser = PartialJsonParser()
    parser.feed('{"a": [1, "tw')
    assert parser.value == {"a": [1, "tw"]}
    assert parser.path == "$.a[1]"
    with pytest.raises(JsonStreamError, match="end of the JSON document"):
        parser.close()


def test_numbers_and_literals_appear_only_when_complete() -> None:
    parser = PartialJsonParser()
    parser.feed('{"n": 12')
    assert parser.value == {}
    parser.feed("3, ")
    assert parser.value == {"n": 123}
    parser.feed('"t": tru')
    assert parser.value == {"n": 123}
    parser.feed("e}")
    assert parser.value == {"n": 123, "t": True}
    assert parser.done


def test_top_level_number_completes_on_close() -> None:
    parser = PartialJsonParser()
    parser.feed("-12.5e")
    parser.feed("+3")
    assert not parser.done
    assert parser.close() == -12.5e3


def test_snapshots_are_not_changed_by_later_feeds() -> None:
    parser = PartialJsonParser()
    parser.feed('{"items": [{"a": 1}, "x')
    first = parser.value
    parser.feed('yz", 2], "b": "c"}')
    assert first == {"items": [{"a": 1}, "x"]}
    assert parser.value == {"items": [{"a": 1}, "xyz", 2], "b": "c"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def begin(self, kind: str, key: str | int | None) -> None:
        self.calls.append(("begin", (kind, key)))

    def key(self, name: str) -> None:
        self.calls.append(("key", name))

    def chunk(self, text: str) -> None:
        self.calls.append(("chunk", text))

    def end(self, value: Any) -> None:
        self.calls.append(("end", value))


def test_listener_sees_nested_structure() -> None:
    recorder = Recorder()
    parser = PartialJsonParser(recorder)
    for char in '{"a": ["x\\n", 2], "b": null}':
        parser.feed(char)
    calls = [c for c in recorder.calls if c[0] != "chunk"]
    assert calls == [
        ("begin", ("object", None)),
        ("key", "a"),
        ("begin", ("array", "a")),
        ("begin", ("string", 0)),
        ("end", "x\n"),
        ("begin", ("number", 1)),
        ("end", 2),
        ("end", ["x\n", 2]),
        ("key", "b"),
        ("begin", ("null", "b")),
        ("end", None),
        ("end", {"a": ["x\n", 2], "b": None}),
    ]
    assert "".join(c[1] for c in recorder.calls if c[0] == "chunk") == "x\n"


def test_format_path() -> None:
    assert format_path([]) == "$"
    assert format_path(["a", 0, "b c", "it's"]) == "$.a[0]['b c']['it\\'s']"


def test_version_changes_only_when_the_value_does() -> None:
    parser = PartialJsonParser()
    versions = []
    for piece in ['{"a"', ": ", "12", "3", ", ", '"b": "x', "y", '"', "}", " "]:
        parser.feed(piece)
        versions.append(parser.version)
    changed = [b != a for a, b in itertools.pairwise(versions)]
    # '{"a"' opened the object; ': ', '12', '3', ', ' leave the value as it was (the number
    # completes at ','); '"b": "x' and 'y' grow it; '"' completes 'xy' (same value).
    assert parser.value == {"a": 123, "b": "xy"}
    assert changed[:3] == [False, False, False]
    assert changed[3] is True  # ', ' completed 123
    assert changed[4:] == [True, True, False, False, False]  # closing changes nothing
