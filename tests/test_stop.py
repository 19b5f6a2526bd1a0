"""StopMatcher: stop text never escapes, however the text is split into tokens."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tokenwire.stages.stop import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def expected(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference: the text before the stop that is completed first (earliest end)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@given(
    text=st.text(alphabet="ab<|>x ", max_size=40),
    stops=st.lists(st.text(alphabet="ab<|>", min_size=1, max_size=5), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
)
def test_any_split_gives_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    assert run(splits(text, cuts), stops) == expected(text, stops)


def test_holds_back_only_what_could_start_a_stop() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("hello </") == ("hello ", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("x and more") == ("</enx and more", False)


def test_stop_split_across_tokens_is_never_emitted() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("one ST") == ("one ", False)
    assert matcher.feed("OP two") == ("", True)


def test_the_first_completed_stop_wins_whatever_the_split() -> None:
    # "b" completes before "<ba" does: stop there, in one piece or token by token.
    assert run(["<baa"], ["b", "<ba"]) == ("<", True)
    assert run(["<", "b", "a", "a"], ["b", "<ba"]) == ("<", True)


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""


@given(
    text=st.text(alphabet="ab<|>x ", max_size=40),
    stops=st.lists(st.text(alphabet="ab<|>", min_size=1, max_size=5), min_size=1, max_size=3),
    cut=st.integers(min_value=0, max_value=40),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
)
def test_a_primed_matcher_continues_where_the_client_is(
    text: str, stops: list[str], cut: int, cuts: list[int]
) -> None:
    """A continued stream (issue 18): the client has ``text[:cut]``; the matcher primed with
    it sends only what follows, and a stop that began in it still matches."""
    whole, matched = expected(text, stops)
    cut = min(cut, len(whole))  # the client never has text past a stop's start
    if expected(text[:cut], stops)[1]:
        return  # a stop inside what the client has: that stream had ended
    matcher = StopMatcher(stops)
    matcher.prime(text[:cut])
    out, hit = [], False
    for piece in splits(text[cut:], cuts):
        sent, hit = matcher.feed(piece)
        out.append(sent)
        if hit:
            break
    if not hit:
        out.append(matcher.flush())
    assert (text[:cut] + "".join(out), hit) == (whole, matched)
