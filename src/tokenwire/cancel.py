"""Cancellation that crosses the thread boundary between the event loop and model work.

A ``CancelToken`` is set once, from the event loop, with a reason. Decode threads poll
``is_cancelled()`` between tokens (a plain flag read); async code awaits ``wait()``.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["CancelToken"]


class CancelToken:
    __slots__ = ("_event", "_flag", "reason")

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._event: asyncio.Event | None = None
        self.reason: str | None = None

    def cancel(self, reason: str = "stop") -> bool:
        """Set the token; returns False if it was already set (cancel is idempotent)."""
        if self._flag.is_set():
            return False
        self.reason = reason
        self._flag.set()
        if self._event is not None:
            self._event.set()
        return True

    def is_cancelled(self) -> bool:
        return self._flag.is_set()

    async def wait(self) -> str:
        if self._event is None:
            self._event = asyncio.Event()
            if self._flag.is_set():
                self._event.set()
        await self._event.wait()
        return self.reason or "stop"
