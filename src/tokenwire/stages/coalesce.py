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
from dataclasses import dataclass
from typing import Any, Literal

from tokenwire.cancel import CancelToken
from tokenwire.errors import InvalidRequest
from tokenwire.events import Event, TextDelta
from tokenwire.requests import ChatRequest

__all__ = ["COALESCE_KEY", "CoalesceSpec", "coalesce", "coalesce_stage", "parse_coalesce"]

#: Where a request's parsed coalescing choice lives (``ChatRequest.extra``).
COALESCE_KEY = "coalesce"
DEFAULT_MAX_DELAY = 1.0
_MAX_DELAY_LIMIT_MS = 60_000


@dataclass(slots=True, frozen=True)
class CoalesceSpec:
    mode: Literal["none", "word", "line"] = "none"
    max_delay: float | None = None  # seconds

    @property
    def off(self) -> bool:
        return self.mode == "none" and self.max_delay is None


OFF = CoalesceSpec()


def parse_coalesce(value: Any, *, param: str = "stream_options.coalesce") -> CoalesceSpec:
    """Validate a wire or config value; raise ``InvalidRequest`` naming ``param``."""
    if value is None or value is False or value == "off":
        return OFF
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("word", "line"):
            return CoalesceSpec(mode=text, max_delay=DEFAULT_MAX_DELAY)  # type: ignore[arg-type]
        if text.endswith("ms") and text[:-2].strip().isdigit():
            return parse_coalesce({"max_delay_ms": int(text[:-2])}, param=param)
    elif isinstance(value, dict):
        unknown = set(value) - {"mode", "max_delay_ms"}
        mode = value.get("mode", "none")
        delay = value.get("max_delay_ms")
        if not unknown and mode in ("none", "word", "line"):
            if delay is None and mode != "none":
                return CoalesceSpec(mode=mode, max_delay=DEFAULT_MAX_DELAY)
            if (
                isinstance(delay, int)
                and not isinstance(delay, bool)
                and 1 <= delay <= _MAX_DELAY_LIMIT_MS
            ):
                return CoalesceSpec(mode=mode, max_delay=delay / 1000)
    raise InvalidRequest(
        f'{param} must be "word", "line", "off" or {{"max_delay_ms": 1..{_MAX_DELAY_LIMIT_MS}}}'
        f' (optionally with "mode": "word" | "line"), not {value!r}.',
        param=param,
    )


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


async def coalesce(events: AsyncIterator[Event], spec: CoalesceSpec) -> AsyncIterator[Event]:
    """Merge consecutive ``text.delta`` events of ``events`` according to ``spec``."""
    if spec.off:
        async for event in events:
            yield event
        return
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
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(Exception):
            await source.aclose()  # type: ignore[attr-defined]


def coalesce_stage(default: CoalesceSpec = OFF) -> Any:
    """A stream-manager stage applying the request's choice, else ``default``."""

    def stage(
        events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        spec = request.extra.get(COALESCE_KEY, default)
        if not isinstance(spec, CoalesceSpec) or spec.off:
            return events
        return coalesce(events, spec)

    return stage
