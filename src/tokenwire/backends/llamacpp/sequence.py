"""One stream's state inside the embedded engine, and how its output reaches the event loop.

A ``Sequence`` is created on the loop by the backend, handed to the engine thread, and
answered through its ``queue`` (text, then a ``Finished``, or an exception) and ``released``
(the engine dropped its KV sequence). The engine posts each step's items for all streams in
one ``call_soon_threadsafe`` (``deliver``).
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
from dataclasses import dataclass
from typing import Any

from tokenwire.cancel import CancelToken
from tokenwire.requests import ChatRequest
from tokenwire.stops import StopMatcher

__all__ = ["RELEASED", "Finished", "Item", "Sequence", "deliver"]


@dataclass(slots=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    decode_seconds: float
    cached_tokens: int = 0
    produced_tokens: int = 0  # of completion_tokens, those a continued stream started with


Item = str | Finished | BaseException
RELEASED = object()  # outbox marker: the engine has freed the sequence


class Sequence:
    """One stream inside the shared batch: its KV sequence, sampler chain and text state.

    Touched only by the engine thread, except ``stop`` (a flag the loop may set), and
    ``queue`` / ``released``, which only the loop touches (the engine posts to them).
    """

    def __init__(
        self,
        prompt: list[int],
        request: ChatRequest,
        limit: int,
        cancel: CancelToken,
        loop: asyncio.AbstractEventLoop,
        grammar: Any = None,
        produced: list[int] | None = None,
        partial: str = "",
    ) -> None:
        # A continued stream (``continue_final_message``): its answer so far (``partial``, as
        # tokens ``produced``) is prefilled after the prompt, replayed through the samplers,
        # primes the stop sequences, and counts as completion tokens.
        self.produced = produced or []
        self.prompt = prompt + self.produced  # every token fed before the first sample
        self.request = request
        self.limit = limit
        self.cancel = cancel
        self.loop = loop
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.released: asyncio.Future[None] = loop.create_future()
        self.grammar = grammar  # a llama_cpp.LlamaGrammar for JSON / tool calls, or None
        self.stop = threading.Event()  # the consumer went away
        self.seq_id = -1
        self.fed = 0  # prompt tokens already in the KV cache
        self.cached = 0  # prompt tokens whose KV cells a finished stream left behind
        self.next_token = -1  # sampled, to be fed in the next step
        self.completed = len(self.produced)
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.sampler: Any = None
        self.grammar_sampler: Any = None  # a llama_sampler pointer, outside the chain
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(request.sampling.stop)
        self.stops.prime(partial)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def should_stop(self) -> bool:
        return self.cancel.is_cancelled() or self.stop.is_set()


def deliver(items: list[tuple[Sequence, object]]) -> None:
    """On the loop: hand one step's output to the streams' queues."""
    for sequence, item in items:
        if item is RELEASED:
            if not sequence.released.done():
                sequence.released.set_result(None)
        else:
            sequence.queue.put_nowait(item)  # type: ignore[arg-type]
