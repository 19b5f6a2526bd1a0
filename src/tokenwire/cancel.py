"""Cancellation that crosses the thread boundary between the event loop and model work.

A ``CancelToken`` is set once, from the event loop, with a reason. Decode threads poll
``is_cancelled()`` between tokens (a plain flag read); async code awaits ``wait()``.
"""

from __future__ import annotations

import asyncio

__all__ = ["CancelToken"]


class CancelToken:
    __slots__ = ("_event", "_flag", "reason")

    def __init__(self) -> None:
        # A plain bool: set once on the loop, read by decode threads (atomic under the
        # GIL). A threading.Event cost ~1 KB per stream, a lot at 10,000 idle streams.
        self._flag = False
        self._event: asyncio.Event | None = None
        self.reason: str | None = None

    def cancel(self, reason: str = "stop") -> bool:
        """Set the token; returns False if it was already set (cancel is idempotent)."""
        if self._flag:
            return False
        self.reason = reason
        self._flag = True
        if self._event is not None:
            self._event.set()
        return True

    def is_cancelled(self) -> bool:
        return self._flag

    async def wait(self) -> str:
        if self._event is None:
            self._event = asyncio.Event()
            if self._flag:
                self._event.set()
        await self._event.wait()
        return self.reason or "stop"
