"""Per-request and per-stream limits the server applies around ``StreamManager.start``.

- ``max_tokens_limit``: a request asking for more is **clamped** to the limit (and one asking
  for nothing gets the limit), rather than refused: clients such as Anthropic's require
  ``max_tokens`` and habitually send large values; ``finish_reason: "length"`` tells them
  where the answer stopped. Documented in docs/guarantees.md.
- ``max_streams_per_key``: streams one key may have generating at once in this process;
  beyond it a 429 with ``Retry-After``. Checked and registered without an ``await`` in
  between, so concurrent starts cannot overshoot.
- ``max_stream_bytes``: the journal bytes (JSON size of the events) one stream may write. The
  stage below fails the stream with ``stream_too_large`` before the event that would cross
  the limit; everything journaled until then stays readable.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import orjson

from tokenwire.cancel import CancelToken
from tokenwire.errors import Overloaded, StreamTooLarge
from tokenwire.events import Event, TextDelta
from tokenwire.requests import ChatRequest
from tokenwire.streams import Stage

__all__ = ["check_concurrency", "clamp_max_tokens", "event_size", "stream_size_stage"]


def event_size(event: Event) -> int:
    """Bytes an event takes in a journal (its JSON form)."""
    if type(event) is TextDelta:
        # The per-token case, without building the dict: the same bytes as below.
        return _TEXT_DELTA_SIZE + len(str(event.seq)) + len(orjson.dumps(event.text))
    return len(orjson.dumps(event.to_dict()))


#: ``{"type":"text.delta","seq":,"text":}`` around a TextDelta's seq and text.
_TEXT_DELTA_SIZE = len(b'{"type":"text.delta","seq":,"text":}')


def clamp_max_tokens(request: ChatRequest, limit: int) -> None:
    if limit <= 0:
        return
    wanted = request.sampling.max_tokens
    if wanted is None or wanted > limit:
        request.sampling.max_tokens = limit


def check_concurrency(active: int, limit: int) -> None:
    if 0 < limit <= active:
        raise Overloaded(
            f"Too many concurrent streams for this key: at most {limit} may generate at once.",
            retry_after=1.0,
            code="too_many_streams",
        )


def stream_size_stage(max_bytes: int) -> Stage:
    """The outermost stage: fail a stream that grows past ``max_bytes`` of journal."""

    def stage(
        events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        if max_bytes <= 0:
            return events
        return _limited(events, max_bytes)

    return stage


async def _limited(events: AsyncIterator[Event], max_bytes: int) -> AsyncIterator[Event]:
    written = 0
    # Closing the inner iterator at once stops the backend (decode slot, upstream socket).
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            written += event_size(event)
            if written > max_bytes and not event.terminal:
                raise StreamTooLarge(
                    f"The stream exceeded its journal limit of {max_bytes} bytes; "
                    "the output until then is kept."
                )
            yield event
