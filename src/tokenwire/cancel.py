"""Cancellation that crosses the thread boundary between the event loop and model work.

A ``CancelToken`` is set once, from the event loop, with a reason. Decode threads poll
``is_cancelled()`` between tokens (a plain flag read); async code awaits ``wait()``.

Both rest on ``LeanEvent``, ``asyncio.Event``'s interface with its waiter list made on first
wait: every open stream holds a token, and every connection two events (server/http.py), so
an ``asyncio.Event``'s ~0.9 KB (its deque preallocates 64 slots) or a ``threading.Event``'s
~1 KB each would add up at 10,000 idle streams (benchmarks/idle_capacity.py).
"""

from __future__ import annotations

import asyncio
from typing import Literal

__all__ = ["CancelToken", "LeanEvent"]


class LeanEvent:
    """``asyncio.Event``'s interface in ~60 bytes instead of ~900 (no deque, no dict)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    def future(self) -> asyncio.Future[bool]:
        """A future resolved when the event is set: a callback on it watches the event
        with no task. Cancel it to stop watching."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._value:
            waiter.set_result(True)
        elif self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        return waiter

    async def wait(self) -> Literal[True]:
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:  # cancelled before set()
                waiters.remove(waiter)


class CancelToken:
    __slots__ = ("_set", "reason")

    def __init__(self) -> None:
        # Its flag is a plain bool: set once on the loop, read by decode threads (atomic
        # under the GIL).
        self._set = LeanEvent()
        self.reason: str | None = None

    def cancel(self, reason: str = "stop") -> bool:
        """Set the token; returns False if it was already set (cancel is idempotent)."""
        if self._set._value:
            return False
        self.reason = reason
        self._set.set()
        return True

    def is_cancelled(self) -> bool:
        return self._set._value  # read per token: no method call of the event's

    async def wait(self) -> str:
        await self._set.wait()
        return self.reason or "stop"

    def future(self) -> asyncio.Future[bool]:
        """Resolved when the token is set (``LeanEvent.future``)."""
        return self._set.future()
