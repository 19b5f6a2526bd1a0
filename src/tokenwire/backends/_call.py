"""One attempt against one upstream (``UpstreamCall``): the request, its body read as it
arrives, decoded by the wire's codec, with deadlines, Stop and failover's first-token gate.

It promises:

- the upstream's bytes are decoded incrementally (the one ``SSEDecoder``, then the wire's
  ``WireDecoder``): the events of a network read are handed on the moment the read
  returns; the body is read through ``UpstreamTransport`` (``_transport.py``), which hands
  over all bytes received in one piece;
- ``opened`` resolves when the upstream answered 2xx; refused connections, 5xx and timeouts
  raise ``BackendUnavailable`` / ``BackendTimeout``, a 4xx the client caused raises
  ``InvalidRequest`` (the gateway fails over on the former, never on the latter);
- up to the first token the call reads on its own, while the consumer waits for its
  events (nothing reached the client yet, so the gateway can fail over; ``announce_at``
  hands the consumer a progress event if the first token is slow; ``ready`` resolves at
  the first token, for whoever watches it): an opening task sends the request and awaits
  the answer's headers, then, on ``UpstreamTransport``, the body's reads are decoded in the
  network callback itself, which wakes the consumer at once with the first token (no task
  between the socket and the consumer; the end of the body or an error wakes a callback,
  not a task); from then on the consumer reads in its own
  task, so a chunk goes from the socket to the journal with no hand-off between tasks;
  given a sink (``push_to``), the events of each read go to it in the network callback
  itself, with no task woken at all;
- a read's good messages go out before a bad one's error;
- a first-token deadline, then an inter-token idle deadline (time spent waiting on the
  upstream), both kept by one timer that is re-armed only when it fires (no per-chunk
  timer cost);
- Stop (the ``CancelToken``), a timeout or closing the call ends the wait on the upstream at
  once (cancelling the opening task, closing the body read in the network callback, or
  cancelling the consumer's read in progress as ``asyncio.timeout`` does: cancel, then
  ``uncancel``), which closes the upstream HTTP
  connection, so the upstream stops generating; a complete answer's connection is drained
  in the background and goes back to the pool.

Foreign exceptions (httpx) are translated at this edge (``_http_errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import httpx
import orjson

from tokenwire.backends._body import ResponseBody, background
from tokenwire.backends._http_errors import status_error, translate
from tokenwire.backends.base import EventSink
from tokenwire.cancel import CancelToken
from tokenwire.codecs import RawEvent, SSEDecoder, WireDecoder
from tokenwire.errors import BackendError, BackendTimeout
from tokenwire.events import (
    Event,
    StreamCompleted,
    TextDelta,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)

__all__ = ["Phase", "UpstreamCall", "is_content"]

#: Events that mean the upstream has started answering; before one of them a failure is
#: invisible to the client (the gateway fails over), after it the failure is the client's.
_CONTENT = (TextDelta, ToolCallStarted, ToolCallDelta, StreamCompleted)


def is_content(event: Event) -> bool:
    return isinstance(event, _CONTENT)


class Deadlines(Protocol):
    @property
    def first_token_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...


class Upstream(Protocol):
    """What a call needs of its backend (``_upstream.UpstreamBackend``)."""

    name: str

    @property
    def config(self) -> Deadlines: ...
    async def send(self, url: str, content: bytes) -> httpx.Response: ...
    def decoder(self) -> WireDecoder: ...
    def retry_body(self, body: dict[str, Any], rejection: str) -> dict[str, Any] | None: ...


class Phase(enum.Enum):
    """Where an ``UpstreamCall`` is; each phase says who reads the body."""

    #: The request is sent and the body read up to the first content event (by the
    #: opening task, or on UpstreamTransport in the network callback).
    OPENING = "opening"
    #: Content started: the consumer reads the body (or is pushed its events).
    RELAYING = "relaying"
    #: The upstream sent its terminal message; the rest of the body is only drained.
    COMPLETE = "complete"
    #: The body ended, failed or was interrupted: nothing more is read.
    ENDED = "ended"


class UpstreamCall:
    """One HTTP request to one upstream (see the module docstring)."""

    def __init__(
        self,
        backend: Upstream,
        url: str,
        body: dict[str, Any],
        cancel: CancelToken,
    ) -> None:
        self.backend = backend
        self.cancel = cancel
        self.phase = Phase.OPENING
        self._loop = loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        #: Resolves at the first content event or the end of the attempt (with its error).
        self.ready: asyncio.Future[None] = loop.create_future()
        #: Milliseconds from sending the request to the first content event.
        self.ttft_ms: float | None = None
        self._sse = SSEDecoder()
        self._decoder: WireDecoder = backend.decoder()
        # A list, not a deque: it holds one read's events at most (those the consumer has
        # not taken yet), and a deque preallocates 64 slots (~760 B for each stream's life).
        self._buffer: list[Event] = []
        #: The body, handed by the opening task to the consumer when relaying starts.
        self._body: ResponseBody | None = None
        #: The attempt's failure (raised to the consumer after the events before it).
        self._error: BaseException | None = None
        self._stopped = False
        #: The consumer task while it awaits the upstream (only then is it interrupted).
        self._reader: asyncio.Task[Any] | None = None
        self._interrupting = False
        self._waiter: asyncio.Future[None] | None = None
        self._sink: EventSink | None = None
        self._started = self._read_at = loop.time()
        #: The opening task until it ends (then dropped: a finished task and its coroutine
        #: are ~600 B for each stream's life).
        self._task: asyncio.Task[None] | None = loop.create_task(
            self._open(url, body), name=f"upstream-{backend.name}"
        )
        # Stop is watched by a callback, not a task of its own.
        self._watch = cancel.future()
        self._watch.add_done_callback(self._cancelled)
        self._announce: asyncio.TimerHandle | None = None
        self._timer = loop.call_at(
            self._started + backend.config.first_token_timeout, self._check_deadline
        )

    @property
    def content_started(self) -> bool:
        return self.ttft_ms is not None

    # -- decoding: every read, whoever does it ---------------------------------------------

    def _decode(self, messages: list[RawEvent]) -> list[Event]:
        """The events of one read's SSE messages. A bad message ends the list: its error is
        kept in ``_error``, raised once the events before it went out."""
        decoder = self._decoder
        events: list[Event] = []
        try:
            for name, data, _ in messages:
                events += decoder.decode(name, data)
                if decoder.done:
                    break  # later bytes are ignored
        except Exception as exc:
            self._error = self._error or translate(exc, self.backend.name)
        if events:
            if self.ttft_ms is None:
                self._first_content(events)
            for event in events:
                if type(event) is Usage and event.ttft_ms is None:
                    event.ttft_ms = self.ttft_ms  # the upstream's, for metrics
        return events

    def _end(self) -> list[Event]:
        """The body ended: the last message if it was left open, then the closing events
        (or, in ``_error``, that the upstream stopped short)."""
        events = self._decode(self._sse.flush())
        if self._error is None and not self._decoder.done:
            try:
                events += self._decode_closing()
            except Exception as exc:
                self._error = translate(exc, self.backend.name)
        return events

    def _decode_closing(self) -> list[Event]:
        events = self._decoder.finish()
        if self.ttft_ms is None and events:
            self._first_content(events)
        for event in events:
            if type(event) is Usage and event.ttft_ms is None:
                event.ttft_ms = self.ttft_ms
        return events

    def _first_content(self, events: list[Event]) -> None:
        if not any(isinstance(event, _CONTENT) for event in events):
            return
        now = self._loop.time()
        self.ttft_ms = round((now - self._started) * 1000, 2)
        self.ready.set_result(None)
        # From now on the (usually shorter) idle deadline applies.
        self._timer.cancel()
        self._read_at = now
        self._timer = self._loop.call_at(
            now + self.backend.config.idle_timeout, self._check_deadline
        )

    # -- the opening task ------------------------------------------------------------------

    async def _open(self, url: str, body: dict[str, Any]) -> None:
        response: httpx.Response | None = None
        try:
            response = await self._respond(url, body)
            if not self.opened.done():
                self.opened.set_result(None)
            reader = ResponseBody(response)
            if reader.direct is not None:
                # From here the network callback reads (``_opening_push``): no task wakes
                # to decide the first token.
                self._body, response = reader, None
                self._opening_read()
                return
            while self._error is None:
                raw = await reader.read()
                events = self._decode(self._sse.feed_raw(raw)) if raw else self._end()
                if events:
                    self._buffer.extend(events)
                    self._wake()
                if not raw or self._error is not None:
                    break
                if self._decoder.done:
                    self.phase = Phase.COMPLETE
                    await reader.close(drain=True)  # the connection goes back to the pool
                    break
                if self.content_started:
                    # The consumer reads on from here, in its own task.
                    self._body, response = reader, None
                    self.phase = Phase.RELAYING
                    return
        except asyncio.CancelledError:
            pass  # Stop or a timeout: whoever cancelled set the outcome
        except BaseException as exc:
            self._error = translate(exc, self.backend.name)
            if not isinstance(exc, Exception):
                raise
        finally:
            if response is not None:
                await response.aclose()
            if self._body is None or self.phase is not Phase.OPENING:
                self._opening_over()
            self._task = None

    # -- the opening phase, pushed: UpstreamTransport's body read in the network callback --

    def _opening_read(self) -> None:
        """Take what the body holds, then read on in the network callback: ``_opening_push``
        for bytes, a done-callback on the body's waiter for its end or an error."""
        reader = self._body
        if self.phase is not Phase.OPENING or reader is None or reader.direct is None:
            return
        body = reader.direct
        try:
            raw = body.take()
        except Exception as exc:
            self._error = self._error or translate(exc, self.backend.name)
            raw = b""
        if raw is None:
            body.push_to(self._opening_push)
            body.waiter().add_done_callback(self._opening_woken)
            return
        body.push_to(None)
        if self._opening_took(raw):
            self._opening_read()

    def _opening_push(self, raw: bytes) -> bool:
        """A read while opening, in the network callback. True: the body's waiter (and its
        callback) need not wake; the end of the body or an error wakes it anyway."""
        if self.phase is not Phase.OPENING:
            return False
        self._opening_took(raw)
        return True

    def _opening_woken(self, _: asyncio.Future[None]) -> None:
        # The body ended or failed (or bytes came while nobody pushed): read what is there.
        self._opening_read()

    def _opening_took(self, raw: bytes) -> bool:
        """Decode one read while opening and hand its events to the consumer. True: still
        opening (read on); False: relaying, complete or ended."""
        events = self._decode(self._sse.feed_raw(raw)) if raw else self._end()
        if events:
            self._buffer.extend(events)
            self._wake()
        reader = self._body
        assert reader is not None
        if not raw or self._error is not None:
            self._body = None
            reader.leave()
            self._opening_over()
            return False
        if self._decoder.done:
            self.phase = Phase.COMPLETE  # aclose drains the body in the background
            self._opening_over()
            return False
        if self.content_started:
            assert reader.direct is not None
            reader.direct.push_to(None)  # the consumer reads on (or pushes to its sink)
            self.phase = Phase.RELAYING
            self._opening_over()
            return False
        return True

    def _opening_over(self) -> None:
        if self.phase is not Phase.RELAYING:
            if self.phase is Phase.OPENING:
                self.phase = Phase.ENDED
            self._timer.cancel()
        for future in (self.opened, self.ready):
            if future.done():
                continue
            if self._error is not None:
                future.set_exception(self._error)
                future.exception()  # retrieved: the consumer may never look
            else:
                future.set_result(None)
        self._wake()

    async def _respond(self, url: str, body: dict[str, Any]) -> httpx.Response:
        """The upstream's 2xx response headers, or raise its refusal."""
        backend = self.backend
        response = await self._send(url, body)
        if response.status_code in (400, 422):
            # An older server may refuse an optional field; the backend may drop it once.
            error = await status_error(backend.name, response)
            body_again = backend.retry_body(body, error.message)
            if body_again is None:
                raise error
            await response.aclose()
            response = await self._send(url, body_again)
        if response.status_code >= 300:
            raise await status_error(backend.name, response)
        return response

    async def _send(self, url: str, body: dict[str, Any]) -> httpx.Response:
        return await self.backend.send(url, orjson.dumps(body))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- interruptions ---------------------------------------------------------------------

    def _check_deadline(self) -> None:
        if self.phase is Phase.COMPLETE or self.phase is Phase.ENDED:
            return
        now = self._loop.time()
        config = self.backend.config
        if self.content_started:
            limit, what = config.idle_timeout, "between tokens"
            if self._reader is None and self.phase is Phase.RELAYING:
                # The consumer is not waiting on the upstream (its reader is behind):
                # time spent there is not the upstream's silence.
                self._timer = self._loop.call_at(now + limit, self._check_deadline)
                return
            deadline = self._read_at + limit
        else:
            limit, what = config.first_token_timeout, "before the first token"
            deadline = self._started + limit
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
            return
        self._interrupt(
            BackendTimeout(
                f"upstream {self.backend.name} sent nothing for {limit:g}s {what}",
                code="upstream_timeout",
            )
        )

    def _cancelled(self, watch: asyncio.Future[bool]) -> None:
        if not watch.cancelled():
            self._interrupt(None)

    def announce_at(self, when: float, event: Event) -> None:
        """Unless content started by loop time ``when``, hand ``event`` (a progress event)
        to the consumer then: it starts the stream while the call still waits."""
        self._announce = self._loop.call_at(when, self._announced, event)

    def _announced(self, event: Event) -> None:
        if self.phase is Phase.OPENING and not self.content_started:
            self._buffer.append(event)
            self._wake()

    def _interrupt(self, error: BackendError | None) -> None:
        """Stop (``error`` None) or a timeout: end the wait on the upstream at once."""
        if self.phase is Phase.COMPLETE or self.phase is Phase.ENDED:
            return
        if error is None:
            self._stopped = True
        elif self._error is None:
            self._error = error
        if self.phase is Phase.OPENING:
            task = self._task
            if task is not None and not task.done():
                task.cancel()
            else:  # read in the network callback: close the body here
                reader, self._body = self._body, None
                if reader is not None:
                    reader.leave()
                self._opening_over()
        elif self._reader is not None and not self._interrupting:
            self._interrupting = True
            self._reader.cancel()
        # else the consumer is elsewhere: it sees the outcome before its next read.

    # -- the consumer ----------------------------------------------------------------------

    def push_to(self, sink: EventSink) -> None:
        """Once relaying (and read through ``UpstreamTransport``), hand each read's events
        to ``sink`` in the network callback (``backends.base.PushSource``)."""
        self._sink = sink

    def _pushed(self, raw: bytes) -> bool:
        """The network callback while relaying with a sink: ``raw``'s events go straight
        to it. True: all taken, the reader sleeps on. False: the reader wakes for what is
        left: events the sink refused (in ``_buffer``; pushing is over), an error, the end.
        """
        sink, buffer = self._sink, self._buffer
        if self.phase is not Phase.RELAYING or sink is None or self._stopped:
            return False  # ending: the reader sees why
        if self._error is not None:
            return False  # failed: the reader raises it
        self._read_at = self._loop.time()
        for event in self._decode(self._sse.feed_raw(raw)):
            if buffer or not sink(event):
                buffer.append(event)  # in order, after the one refused
        return not (buffer or self._error is not None or self._decoder.done)

    async def events(self) -> AsyncIterator[Event]:
        """The events as they arrive; ends quietly on Stop, raises ``BackendError``s.

        While relaying, a chunk's events resume only this generator on their way to the
        consumer (the opening phase's own generator is done by then)."""
        async for event in self._opening_events():
            yield event
        reader = self._body
        if self.phase is not Phase.RELAYING or reader is None:
            self._raise_failure()
            return
        # Relaying: read the body in this task, each read's events handed on at once.
        body, buffer = reader.direct, self._buffer
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        reader.push_to(self._pushed if self._sink is not None else None)
        try:
            while self._reading():
                if buffer:
                    reader.push_to(None)  # what pushing left: the events the sink refused
                    while buffer:
                        yield buffer.pop(0)
                    continue
                raw: bytes | None
                if body is None:
                    raw = await self._await_upstream(task, reader.read())
                elif (raw := body.take()) is None:
                    # UpstreamTransport's body, read directly (no generator layers).
                    self._read_at = self._loop.time()
                    self._reader = task
                    try:
                        await body.waiter()
                    finally:
                        self._reader = None
                    continue
                if not raw:  # the end of the body
                    self.phase = Phase.ENDED
                    for event in self._end():
                        yield event
                    break
                for event in self._decode(self._sse.feed_raw(raw)):
                    yield event
        except asyncio.CancelledError:  # in a wait on the upstream
            reader.leave()
            if not self._interrupted(task, cancelling):
                raise  # not ours (shutdown)
        except Exception as exc:
            self._error = self._error or translate(exc, self.backend.name)
        finally:
            reader.push_to(None)
        for event in self._relay_over():
            yield event
        self._raise_failure()

    async def _opening_events(self) -> AsyncIterator[Event]:
        """What the opening task read, as it reads it, until the consumer reads on."""
        buffer = self._buffer
        while True:
            while buffer:
                event = buffer.pop(0)
                yield event
                if event.terminal:
                    return
            if self.phase is not Phase.OPENING:
                return
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None

    def _reading(self) -> bool:
        return not (self._stopped or self._error is not None or self._decoder.done)

    def _interrupted(self, task: asyncio.Task[Any], cancelling: int) -> bool:
        """The consumer's read was cancelled by ``_interrupt`` (not by a shutdown)."""
        if not self._interrupting or task.uncancel() > cancelling:
            return False
        self._interrupting = False
        return True

    def _raise_failure(self) -> None:
        if self._error is not None and not self._stopped:
            raise self._error

    def _relay_over(self) -> list[Event]:
        """Relaying ended (the answer, an error, Stop): what pushing left to hand on (the
        terminal event; after Stop the manager ends the stream itself)."""
        if self.phase is Phase.RELAYING:
            self.phase = Phase.COMPLETE if self._decoder.done else Phase.ENDED
        left = [] if self._stopped else list(self._buffer)
        self._buffer.clear()
        return left

    async def _await_upstream(self, task: asyncio.Task[Any], read: Awaitable[bytes]) -> bytes:
        """Wait on the upstream as the one interruptible reader."""
        self._read_at = self._loop.time()
        self._reader = task
        try:
            return await read
        finally:
            self._reader = None

    async def aclose(self) -> None:
        """Stop reading; closes the upstream connection if the answer was not finished."""
        phase = self.phase
        if phase is not Phase.COMPLETE:
            self.phase = Phase.ENDED
        self._timer.cancel()
        self._watch.cancel()
        if self._announce is not None:
            self._announce.cancel()
        task = self._task
        if task is not None and not task.done():
            if phase is Phase.COMPLETE:
                # The answer is complete; let the opening task drain the body.
                background(task)
            else:
                task.cancel()
                # Bounded: closing a socket does not block, but never hang a producer on it.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task}, timeout=2.0)
        reader, self._body = self._body, None
        if reader is not None:
            if phase is Phase.COMPLETE:
                # A complete answer: read the end of its body in the background, so the
                # connection goes back to the pool.
                background(self._loop.create_task(reader.close(drain=True)))
            else:
                await reader.close(drain=False)
        if not self.ready.done():  # read in the network callback: no task resolves them
            self._opening_over()
