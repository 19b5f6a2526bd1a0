"""Graceful shutdown: drain in-flight streams, then end the rest with a terminal event.

``tokenwire serve`` calls ``Drain.request()`` from uvicorn's exit handler (SIGTERM / SIGINT),
at the moment uvicorn stops accepting connections; no uvicorn internals are patched. The
app's lifespan runs ``Drain.watch``:

1. new streams are refused with 503 (``BackendUnavailable``, code ``shutting_down``) on
   connections that are still open;
2. in a shared deployment (``--journal redis://…``), streams another replica can continue
   are handed over at once: this replica stops producing them without a terminal event and
   releases them, another claims and continues them (streams.py, takeover.py), and local
   readers end without a terminal so their clients resume on another replica;
3. the other in-flight streams get ``drain_timeout`` seconds to finish on their own;
4. what is still generating then is cancelled with reason ``shutdown``, so every reader gets
   ``stream.cancelled`` rendered as its protocol's terminal frame (OpenAI: a finish chunk and
   ``[DONE]``; Anthropic: ``message_stop``) and the response ends cleanly;
5. the lifespan's shutdown then closes the stream manager and the journal (the Redis
   journal flushes its queued appends before it closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tokenwire.errors import BackendUnavailable
from tokenwire.streams import StreamManager

__all__ = ["Drain"]

log = logging.getLogger("tokenwire.server.shutdown")


class Drain:
    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requested: asyncio.Event | None = None

    def bind(self) -> None:
        """Called in the lifespan: remember the loop ``request`` must wake."""
        self._loop = asyncio.get_running_loop()
        self._requested = asyncio.Event()

    def request(self) -> None:
        """Begin draining. Safe to call from a signal handler or another thread."""
        if self._loop is None or self._requested is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._requested.set)

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise BackendUnavailable(
                "The server is shutting down; retry on another replica.", code="shutting_down"
            )

    async def watch(self, manager: StreamManager) -> None:
        assert self._requested is not None, "bind() first"
        await self._requested.wait()
        self.draining = True
        started = time.monotonic()
        if manager.control.shared:
            # Zero-downtime restarts: streams another replica can continue are handed over
            # at once (released, taken over there), not drained or cut.
            handed = await manager.hand_over_all()
            if handed:
                log.warning("handed %d stream(s) over to the other replicas", handed)
        log.warning(
            "shutting down: draining %d stream(s) for up to %gs",
            manager.active_streams,
            self.timeout,
        )
        await _until_idle(manager, self.timeout)
        left = manager.cancel_all("shutdown")
        if left:
            log.warning("drain timeout: cancelled %d stream(s) with reason 'shutdown'", left)
            await _until_idle(manager, 5.0)
        log.warning("drained in %.1fs", time.monotonic() - started)


async def _until_idle(manager: StreamManager, within: float) -> None:
    # Polled: streams end in the producer tasks, which have no "all done" event to wait on.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                if not manager.active_streams:
                    return
                await asyncio.sleep(0.05)
