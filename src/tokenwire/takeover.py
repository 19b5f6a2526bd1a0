"""Takeover: what another replica needs to continue a stream whose producer was lost.

When a stream's producer dies (its liveness lapses) or hands it over on SIGTERM (releases
it), a surviving replica claims it (``ControlPlane.claim``, atomic: one winner) and continues
generating into the same log; ``StreamManager`` drives that. This module decides whether and
how a stream can be continued, from what the journal stores:

- the request, kept in the stream's metadata (``StreamMeta.request``) where replicas share
  the journal;
- the events so far: the partial text becomes an assistant prefill
  (``Backend.continuation``), so the model picks up where it stopped, with the same
  sampling parameters.

A stream is continued only when all of this holds, and otherwise ends ``producer_lost`` as
before (docs/guarantees.md lists the cases): its request was stored; its backend can
continue an answer (the embedded model can, also under a JSON grammar; Anthropic upstreams
and OpenAI-compatible ones configured with ``prefill`` can for text); it declares no tools;
and no tool call was open when the producer stopped.
The continuation starts with a ``progress`` event (stage ``takeover``); the new producer
writes no second ``stream.started``, and sequence numbers continue.
"""

from __future__ import annotations

from tokenwire.backends.base import Backend
from tokenwire.events import (
    Event,
    Progress,
    StreamFailed,
    TextDelta,
    ToolCallCompleted,
    ToolCallStarted,
)
from tokenwire.journal.base import StreamMeta
from tokenwire.requests import ChatRequest

__all__ = [
    "TAKEOVER_STAGE",
    "continuable_request",
    "continuation",
    "producer_lost",
    "takeover_progress",
]

#: The ``progress`` stage that says a takeover happened.
TAKEOVER_STAGE = "takeover"


def continuable_request(meta: StreamMeta) -> ChatRequest | None:
    """The stream's request, if it was stored and declares no tools (a partial answer may
    stop inside a call's arguments). Structured output is the backend's call: the embedded
    engine replays the partial answer through its grammar, and the structured-output and
    guard stages start from it (``ChatRequest.prefill``)."""
    if meta.request is None:
        return None
    request = ChatRequest.from_dict(meta.request)
    if request.tools:
        return None
    return request


def continuation(request: ChatRequest, backend: Backend, events: list[Event]) -> ChatRequest | None:
    """The request that continues the answer the ``events`` so far began; None if a tool call
    was open or the backend cannot continue."""
    open_calls: set[int] = set()
    parts: list[str] = []
    for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, ToolCallStarted):
            open_calls.add(event.index)
        elif isinstance(event, ToolCallCompleted):
            open_calls.discard(event.index)
    if open_calls:
        return None
    return backend.continuation(request, "".join(parts))


def takeover_progress(previous: str | None) -> Progress:
    why = "its replica stopped" if previous else "its replica handed it over"
    return Progress(stage=TAKEOVER_STAGE, message=f"Continuing on another replica: {why}.")


def producer_lost(why: str) -> StreamFailed:
    """How a stream whose producer was lost ends when it cannot be continued."""
    return StreamFailed(
        error={
            "type": "producer_lost",
            "message": f"The replica producing this stream stopped and {why}; the partial "
            "output above is all there is.",
            "code": "producer_lost",
        }
    )
