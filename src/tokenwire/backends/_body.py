"""A response body as an ``UpstreamCall`` reads it (``ResponseBody``), and the background
drain of a complete answer's body (``background``), split from ``_call.py``.

It promises: on ``UpstreamTransport`` the body is read directly (``direct``: no generator
layers per read, and its push to a callback); any other transport's body is read by
iterating; a reader cancelled mid-wait closes the body, so the upstream sees the client
leave; closing with ``drain`` reads a complete answer to its end (bounded), so the
connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx

from tokenwire.backends._transport import direct_body

__all__ = ["ResponseBody", "background"]


class ResponseBody:
    """A response body as the call reads it: ``UpstreamTransport``'s directly when it is
    one (``direct``: no generator layers per read), else by iterating."""

    __slots__ = ("_chunks", "direct", "response")

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.direct = direct_body(response)
        self._chunks = response.aiter_raw() if self.direct is None else None

    def push_to(self, handler: Callable[[bytes], bool] | None) -> None:
        """``UpstreamTransport``'s push (``_Body.push_to``); other bodies are only read."""
        if self.direct is not None:
            self.direct.push_to(handler)

    def leave(self) -> None:
        """A reader cancelled mid-wait closes the body, as iterating does: the upstream sees
        the client leave (iterating closes itself)."""
        if self.direct is not None:
            self.direct.close()

    async def read(self) -> bytes:
        """The bytes received since the last read (``b""``: the end of the body)."""
        body = self.direct
        if body is None:
            assert self._chunks is not None
            return await anext(self._chunks, b"")
        while (raw := body.take()) is None:
            try:
                await body.waiter()
            except BaseException:
                body.close()  # as iterating does: the upstream sees us leave
                raise
        return raw

    async def close(self, *, drain: bool) -> None:
        try:
            if drain:
                with contextlib.suppress(httpx.HTTPError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        while await self.read():
                            pass
            elif self.direct is not None:
                # Closing the body mid-answer closes the connection: the upstream stops.
                self.direct.close()
            elif self._chunks is not None:
                with contextlib.suppress(Exception):
                    await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            with contextlib.suppress(Exception):
                await self.response.aclose()


#: Tasks finishing a complete answer's body (strong refs: the loop keeps weak ones).
_DRAINING: set[asyncio.Task[Any]] = set()


def background(task: asyncio.Task[Any]) -> None:
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)
