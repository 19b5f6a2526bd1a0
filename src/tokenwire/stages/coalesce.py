"""Coalescing: fewer, larger text frames for clients that do not want one per token.

Opt-in per request (``stream_options: {"coalesce": …}`` in chat completions and native
streams) or by the server default (``--coalesce``); without either every token is its own
frame. Forms:

- ``"word"``: text leaves up to the last whitespace, so no frame ends mid-word;
- ``"line"``: text leaves up to the last newline;
- ``{"max_delay_ms": N}``: deltas are merged for at most N ms after the first one waits;
- ``{"mode": "word" | "line", "max_delay_ms": N}``: both; word and line alone wait at most
  ``DEFAULT_MAX_DELAY`` (1 s) so a long run without a boundary still streams.

Promises: the concatenated text is unchanged; every non-text event (usage, tool calls, the
terminal event) first flushes held text, so order is kept; the wait for the next upstream
event is never cancelled by a timer (the pending read is kept across flushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from tokenwire.cancel import CancelToken
from tokenwire.events import Event, TextDelta
from tokenwire.requests import (
    COALESCE_KEY,
    OFF_COALESCE,
    ChatRequest,
    CoalesceSpec,
    parse_coalesce,
)

__all__ = ["COALESCE_KEY", "CoalesceSpec", "coalesce", "coalesce_stage", "parse_coalesce"]


def _cut(buffer: str, mode: str) -> int:
    """How much of ``buffer`` may leave now under ``mode`` (0: hold it all)."""
    if mode == "line":
        return buffer.rfind("\n") + 1
    if mode == "word":
        for index in range(len(buffer) - 1, -1, -1):
            if buffer[index].isspace():
                return index + 1
        return 0
    return 0  # time-only: everything waits for the delay


def coalesce(events: AsyncIterator[Event], spec: CoalesceSpec) -> AsyncIterator[Event]:
    """Merge consecutive ``text.delta`` events of ``events`` according to ``spec``."""
    if spec.off:
        return events
    return _merged(events, spec)


async def _merged(events: AsyncIterator[Event], spec: CoalesceSpec) -> AsyncIterator[Event]:
    """The loop of ``coalesce`` (on the token path: one frame, no call per event)."""
    source = aiter(events)
    pending: asyncio.Future[Event] | None = None
    buffer = ""
    held_since = 0.0
    try:
        while True:
            if buffer and spec.max_delay is not None:
                if pending is None:
                    pending = asyncio.ensure_future(anext(source))
                remaining = held_since + spec.max_delay - time.monotonic()
                if remaining > 0:
                    await asyncio.wait({pending}, timeout=remaining)
                if not pending.done():
                    yield TextDelta(text=buffer)  # the delay is up: send what we have
                    buffer = ""
                    continue
                future, pending = pending, None
                try:
                    event = future.result()
                except StopAsyncIteration:
                    break
            elif pending is not None:
                future, pending = pending, None
                try:
                    event = await future
                except StopAsyncIteration:
                    break
            else:
                try:
                    event = await anext(source)
                except StopAsyncIteration:
                    break
            if isinstance(event, TextDelta):
                if not buffer:
                    held_since = time.monotonic()
                buffer += event.text
                cut = _cut(buffer, spec.mode)
                if cut:
                    yield TextDelta(text=buffer[:cut])
                    buffer = buffer[cut:]
                    held_since = time.monotonic()
                continue
            if buffer:
                yield TextDelta(text=buffer)
                buffer = ""
            yield event
        if buffer:
            yield TextDelta(text=buffer)
    finally:
        await _close(pending, source)


async def _close(pending: asyncio.Future[Event] | None, source: AsyncIterator[Event]) -> None:
    """Cancel the read in flight, if any, and close the source."""
    if pending is not None:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
    with contextlib.suppress(Exception):
        await source.aclose()  # type: ignore[attr-defined]


def coalesce_stage(default: CoalesceSpec = OFF_COALESCE) -> Any:
    """A stream-manager stage applying the request's choice, else ``default``."""

    def stage(
        events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        spec = request.extra.get(COALESCE_KEY, default)
        if not isinstance(spec, CoalesceSpec) or spec.off:
            return events
        return coalesce(events, spec)

    return stage
