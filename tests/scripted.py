"""A scripted backend for fault injection (never the main streaming path).

``ScriptedBackend`` yields a fixed list of steps: text pieces (with an optional gap), a
failure at a chosen point, a silent end, or a stall. It honours the cancel token like a real
backend, and records how many tokens it produced after a cancel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.config import Settings
from tokenwire.errors import BackendError, TokenwireError
from tokenwire.events import Event, Progress, StreamCompleted, TextDelta, Usage
from tokenwire.requests import ChatRequest

from .conftest import free_port, wait_until_healthy


@dataclass
class ScriptedBackend(Backend):
    pieces: list[str] = field(default_factory=lambda: ["Hello", " world", "!"])
    gap: float = 0.0
    fail_after: int | None = None  # raise after this many pieces
    fail_before_first: TokenwireError | None = None
    end_silently: bool = False
    stall_after: int | None = None
    model_id: str = "scripted"
    produced_after_cancel: int = 0
    name: str = "scripted"

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_id)]

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        if self.fail_before_first is not None:
            raise self.fail_before_first
        yield Progress(stage="prefill")
        for index, piece in enumerate(self.pieces):
            if cancel.is_cancelled():
                return
            if self.fail_after is not None and index == self.fail_after:
                raise BackendError("scripted failure mid-stream")
            if self.stall_after is not None and index == self.stall_after:
                await cancel.wait()
                return
            if self.gap:
                await asyncio.sleep(self.gap)
            yield TextDelta(text=piece)
        if self.end_silently:
            return
        yield Usage(prompt_tokens=3, completion_tokens=len(self.pieces))
        yield StreamCompleted(finish_reason="stop")


@contextmanager
def serve_app_in_thread(backend: Backend | None, **settings: Any):  # type: ignore[no-untyped-def]
    """``create_app(backend=…)`` under a real uvicorn on a free port, in a thread, with the
    HTTP protocol ``tokenwire serve`` uses. ``backend=None`` with ``no_embedded=True``: a
    gateway-only server (``upstream=[…]``)."""
    from tokenwire.server.app import create_app
    from tokenwire.server.http import HttpProtocol

    port = free_port()
    app = create_app(Settings(port=port, **settings), backend=backend)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=HttpProtocol, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/healthz", None, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
