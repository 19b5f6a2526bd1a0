"""Backends with controlled timing for the performance tests (metrics, cache, coalescing).

Test doubles for timing only: every claim about streaming is also tested on the real model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.events import Event, Progress, StreamCompleted, TextDelta, Usage
from tokenwire.requests import ChatRequest


@dataclass
class PacedBackend(Backend):
    """Yields ``pieces`` ``gap`` seconds apart after ``first_delay``; counts calls."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", " world", "!"])
    gap: float = 0.0
    first_delay: float = 0.0
    calls: int = 0
    name: str = "paced"

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("paced")]

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        self.calls += 1
        yield Progress(stage="prefill")
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        for index, piece in enumerate(self.pieces):
            if cancel.is_cancelled():
                return
            if index and self.gap:
                await asyncio.sleep(self.gap)
            yield TextDelta(text=piece)
        yield Usage(prompt_tokens=3, completion_tokens=len(self.pieces))
        yield StreamCompleted(finish_reason="stop")
