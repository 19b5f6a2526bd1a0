"""Fair FIFO admission to a scarce resource (an in-process engine's decode slots).

Joining is synchronous, so a full queue is refused before any response header is sent
(429 with Retry-After). Waiters see their position change as the queue moves, for
``progress`` events, and leave cleanly when cancelled. ``admitted`` is the loop any
in-process backend runs around its decoding: queue, ``progress(queued)`` while waiting,
``progress(prefill)``, then the backend's events, and the slot freed when they end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from tokenwire.cancel import CancelToken
from tokenwire.errors import Overloaded
from tokenwire.events import Event, Progress, aclose

__all__ = ["FairQueue", "Ticket", "admitted"]


class Ticket:
    __slots__ = ("_moved", "_queue", "admitted", "left")

    def __init__(self, queue: FairQueue) -> None:
        self._queue = queue
        self._moved = asyncio.Event()
        self.admitted = False
        self.left = False

    @property
    def position(self) -> int:
        """1-based place among the waiters; 0 once admitted."""
        if self.admitted:
            return 0
        return self._queue._waiting.index(self) + 1

    async def positions(self, cancel: CancelToken) -> AsyncIterator[int]:
        """Yield the position each time it changes, ending with 0 (admitted).

        Returns early, without admission, if ``cancel`` is set while waiting.
        """
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            while not self.admitted:
                yield self.position
                self._moved.clear()
                moved = asyncio.ensure_future(self._moved.wait())
                await asyncio.wait({moved, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                moved.cancel()
                if cancel.is_cancelled():
                    return
            yield 0
        finally:
            cancelled.cancel()

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self._queue._leave(self)


class FairQueue:
    def __init__(self, slots: int = 1, max_waiting: int = 64, *, seconds_per_slot: float = 5.0):
        self.slots = slots
        self.max_waiting = max_waiting
        self.seconds_per_slot = seconds_per_slot
        self._running = 0
        self._waiting: deque[Ticket] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def join(self) -> Ticket:
        ticket = Ticket(self)
        if self._running < self.slots and not self._waiting:
            self._running += 1
            ticket.admitted = True
            return ticket
        if len(self._waiting) >= self.max_waiting:
            retry_after = max(1.0, self.seconds_per_slot * (1 + len(self._waiting)) / self.slots)
            raise Overloaded(
                f"The model is busy: {len(self._waiting)} requests are already queued.",
                retry_after=round(retry_after),
                code="queue_full",
            )
        self._waiting.append(ticket)
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        if ticket.admitted:
            self._running -= 1
        else:
            self._waiting.remove(ticket)
        self._admit_next()
        for waiter in self._waiting:
            waiter._moved.set()

    def _admit_next(self) -> None:
        while self._running < self.slots and self._waiting:
            ticket = self._waiting.popleft()
            ticket.admitted = True
            self._running += 1
            ticket._moved.set()


async def admitted(
    queue: FairQueue,
    cancel: CancelToken,
    run: Callable[[], AsyncIterator[Event]],
    *,
    prefill: str,
) -> AsyncGenerator[Event, None]:
    """``run()``'s events once ``queue`` admits this request, with progress before them.

    A full queue raises ``Overloaded`` before any event. While waiting: a
    ``progress(queued)`` event each time the position changes; a cancel while waiting ends
    the stream with no further event. Then ``progress(prefill)`` with ``prefill`` as its
    message, and ``run()``'s events. The slot is given back only after ``run()``'s iterator
    is closed, so a consumer that stops early ends decoding before the next request starts.
    """
    ticket = queue.join()
    try:
        if not ticket.admitted:
            async for position in ticket.positions(cancel):
                if position:
                    yield Progress(
                        stage="queued",
                        message=f"waiting for the model: position {position}",
                        position=position,
                    )
            if cancel.is_cancelled():
                return
        yield Progress(stage="prefill", message=prefill)
        events = run()
        try:
            async for event in events:
                yield event
        finally:
            await aclose(events)
    finally:
        ticket.leave()
