"""Event-stream stages: structured output, tool calls, coalescing, guards.

A stage transforms the event stream of one request, like a middleware: it takes the events
from the backend (or the stage inside it) and yields events. ``pipeline.py`` (one layer up)
composes them from the settings; ``StreamManager`` runs them in each stream's producer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from tokenwire.cancel import CancelToken
from tokenwire.events import Event
from tokenwire.requests import ChatRequest

__all__ = ["Stage"]

#: A stage transforms the event stream of one request (structured output, tools, guards…).
Stage = Callable[[AsyncIterator[Event], ChatRequest, CancelToken], AsyncIterator[Event]]
