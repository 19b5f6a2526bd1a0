"""Guards on partial output: stop generation the moment the streamed text goes off-track.

A guard is a regular expression (``--guard NAME=REGEX``, or ``guard = [...]`` in the config
file) or a Python predicate over the text streamed so far (``@guard`` / ``register_guard``,
or ``--guard-predicate module:attr``). The stage checks every guard on every text delta; when
one fires it closes the backend at once (decoding stops before the next token is handed on),
passes on only the part of that delta before the match, and ends the stream with a
``guard.triggered`` event (which guard, what matched, where) and ``finish_reason``
``content_filter``.

Regexes are checked on a sliding window (the new delta plus ``lookbehind`` characters before
it), so checking stays linear in the output; a match longer than the window can be missed.
A predicate returns something truthy to fire (a string is reported as the match).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tokenwire.cancel import CancelToken
from tokenwire.errors import InvalidRequest
from tokenwire.events import Event, GuardTriggered, StreamCompleted, TextDelta, aclose
from tokenwire.requests import ChatRequest

__all__ = ["Guard", "Guards", "Predicate", "guard", "parse_guard", "register_guard"]

#: The text streamed so far -> falsy (fine), True or the offending text (fire).
Predicate = Callable[[str], bool | str | None]


@dataclass(slots=True)
class Guard:
    name: str
    pattern: re.Pattern[str] | None = None
    predicate: Predicate | None = None


_REGISTERED: list[Guard] = []


def register_guard(name: str, predicate: Predicate) -> Guard:
    """Add a predicate guard to every server started in this process."""
    entry = Guard(name=name, predicate=predicate)
    _REGISTERED.append(entry)
    return entry


def guard(name: str | None = None) -> Callable[[Predicate], Predicate]:
    """Decorator form of ``register_guard``."""

    def decorate(predicate: Predicate) -> Predicate:
        register_guard(name or str(getattr(predicate, "__name__", "guard")), predicate)
        return predicate

    return decorate


def parse_guard(spec: str, index: int = 0) -> Guard:
    """``NAME=REGEX`` or a bare ``REGEX`` (named ``guard-<index>``)."""
    name, sep, pattern = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        name, pattern = f"guard-{index}", spec
    try:
        return Guard(name=name, pattern=re.compile(pattern))
    except re.error as exc:
        raise InvalidRequest(f"--guard {spec!r}: invalid regex: {exc}", param="guard") from exc


def _load_predicate(reference: str) -> Guard:
    module_name, _, attr = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InvalidRequest(f"--guard-predicate {reference}: {exc}", param="guard") from exc
    if not callable(target):
        raise InvalidRequest(f"--guard-predicate {reference}: not callable", param="guard")
    return Guard(name=attr, predicate=target)


class Guards:
    """The stage: checks every configured guard on every text delta."""

    def __init__(self, guards: Iterable[Guard], *, lookbehind: int = 256) -> None:
        self.guards = list(guards)
        self.lookbehind = lookbehind

    @classmethod
    def from_settings(cls, patterns: Iterable[str] = (), predicates: Iterable[str] = ()) -> Guards:
        guards = [parse_guard(spec, i) for i, spec in enumerate(patterns)]
        guards += [_load_predicate(reference) for reference in predicates]
        return cls([*guards, *_REGISTERED])

    def __bool__(self) -> bool:
        return bool(self.guards or _REGISTERED)

    def __call__(
        self, events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        guards = [*self.guards, *(g for g in _REGISTERED if g not in self.guards)]
        if not guards:
            return events
        return self._watch(events, guards, request.prefill)

    async def _watch(
        self, events: AsyncIterator[Event], guards: list[Guard], prefill: str = ""
    ) -> AsyncIterator[Event]:
        patterns = [g for g in guards if g.pattern is not None]
        predicates = [g for g in guards if g.predicate is not None]
        # A continued answer (takeover) starts after its prefill, which already streamed.
        text = prefill  # the whole text, only kept for predicates
        window = prefill[-self.lookbehind :] if self.lookbehind else ""  # before the delta
        window_start = len(prefill) - len(window)  # offset of `window` in the whole text
        try:
            async for event in events:
                if not isinstance(event, TextDelta):
                    yield event
                    continue
                tail = window + event.text
                fired: tuple[Guard, str, int] | None = None
                for entry in patterns:
                    assert entry.pattern is not None
                    match = entry.pattern.search(tail)
                    if match is not None:
                        fired = (entry, match.group(), window_start + match.start())
                        break
                if fired is None and predicates:
                    text += event.text
                    for entry in predicates:
                        assert entry.predicate is not None
                        verdict = entry.predicate(text)
                        if verdict:
                            found = verdict if isinstance(verdict, str) else ""
                            at = text.rfind(found) if found else len(text) - len(event.text)
                            fired = (entry, found, max(at, 0))
                            break
                if fired is not None:
                    entry, found, position = fired
                    # Stop decoding first: nothing after the match is generated or sent.
                    await aclose(events)
                    before = position - (window_start + len(window))
                    if before > 0:
                        yield TextDelta(text=event.text[:before])
                    yield GuardTriggered(guard=entry.name, match=found, position=position)
                    yield StreamCompleted(finish_reason="content_filter")
                    return
                yield event
                keep = tail[-self.lookbehind :] if self.lookbehind else ""
                window_start += len(tail) - len(keep)
                window = keep
        finally:
            await aclose(events)
