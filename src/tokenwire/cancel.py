"""Cancellation that crosses the thread boundary between the event loop and model work.

A ``CancelToken`` is set once, from the event loop, with a reason. Decode threads poll
``is_cancelled()`` between tokens (a plain flag read); async code awaits ``wait()``.
"""

from __future__ import annotations

import asyncio

__all__ = ["CancelToken"]


class CancelToken:
    __slots__ = ("_flag", "_waiters", "reason")

    def __init__(self) -> None:
        # A plain bool: set once on the loop, read by decode threads (atomic under the
        # GIL). A threading.Event cost ~1 KB per stream, a lot at 10,000 idle streams.
        self._flag = False
        # Futures of ``wait()`` callers, made on first wait: an asyncio.Event costs ~0.9 KB
        # (its deque preallocates 64 slots), per stream (benchmarks/idle_capacity.py).
        self._waiters: list[asyncio.Future[None]] | None = None
        self.reason: str | None = None

    def cancel(self, reason: str = "stop") -> bool:
        """Set the token; returns False if it was already set (cancel is idempotent)."""
        if self._flag:
            return False
        self.reason = reason
        self._flag = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        return True

    def is_cancelled(self) -> bool:
        return self._flag

    async def wait(self) -> str:
        if not self._flag:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if self._waiters is not None and waiter in self._waiters:
                    self._waiters.remove(waiter)  # the waiter was cancelled
        return self.reason or "stop"
