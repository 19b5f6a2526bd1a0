"""StreamManager: starts producers, hands out readers, cancels, applies the disconnect policy.

A stream's producer task runs ``backend.stream`` through the stages and appends every event
to the journal; readers tail the journal. They never touch each other, which is what makes
resume, fan-out and Stop-from-anywhere work (DESIGN.md).

Promises:
- ``start`` returns only once the backend accepted the request (its first event), so request
  errors surface as exceptions before any header is sent;
- every stream ends with exactly one terminal event, whatever the backend does;
- a stream that would write more than ``max_stream_bytes`` to the journal fails with
  ``stream_too_large`` before the event that crosses it; what came before stays readable;
- a stream with no readers left is cancelled after ``disconnect_grace`` seconds (0: at once),
  unless it was started ``background=True`` (it then generates to its end unread).

When no stage wraps a backend's iterator that can push (``backends.base.PushSource``) and
the journal appends without awaiting, the producer hands it a sink (``_Appender.take``):
the backend journals each event from its network callback, and a reader following live
writes it to its client there too (``Journal.read_batches(direct=…)``). The producer task
then sleeps until the end, and a relayed chunk costs no task switch at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokenwire.backends.base import Backend, is_push_source
from tokenwire.cancel import CancelToken
from tokenwire.errors import RequestError, StreamHandedOver, StreamTooLarge, TokenwireError
from tokenwire.events import Event, StreamCancelled, StreamFailed, StreamStarted, aclose
from tokenwire.journal.base import Deliver, Journal, StreamMeta, event_size
from tokenwire.journal.control import Claim, ControlPlane
from tokenwire.requests import ChatRequest
from tokenwire.router import Router
from tokenwire.stages import Stage
from tokenwire.takeover import continuable_request, continuation, producer_lost, takeover_progress

__all__ = ["Stage", "StreamManager", "StreamObserver", "new_stream_id"]

log = logging.getLogger("tokenwire.streams")


class StreamObserver(Protocol):
    """Sees every stream's events as they are journaled (metrics); must be cheap and sync."""

    def stream_started(self, stream_id: str) -> None: ...
    def event_appended(self, stream_id: str, event: Event) -> None: ...
    def stream_ended(self, stream_id: str, terminal: Event | None) -> None: ...


#: How long a new stream waits for its first reader before the disconnect policy applies.
_FIRST_READER_WAIT = 5.0


def new_stream_id() -> str:
    """128 random bits, URL-safe: unguessable, so a stream id is a capability."""
    return secrets.token_urlsafe(16)


class _Appender:
    """Journals one stream's events, counting its bytes; from the producer task
    (``append``) or, while it waits, from a push source's callback (``take``)."""

    __slots__ = ("cancel", "journal", "limit", "observe", "stream_id", "written")

    def __init__(
        self,
        stream_id: str,
        journal: Journal,
        cancel: CancelToken,
        limit: int,
        observe: Callable[[str, Event], None] | None,
    ) -> None:
        self.stream_id = stream_id
        self.journal = journal
        self.cancel = cancel
        self.limit = limit
        self.observe = observe
        self.written = 0

    def _written_with(self, event: Event) -> int | None:
        """The stream's journal bytes with ``event``; None if that is past the limit (the
        terminal event always fits: it is how the stream ends)."""
        if not self.limit:
            return 0
        written = self.written + event_size(event)
        return None if written > self.limit and not event.terminal else written

    async def append(self, event: Event) -> None:
        written = self._written_with(event)
        if written is None:
            raise StreamTooLarge(
                f"The stream exceeded its journal limit of {self.limit} bytes; "
                "the output until then is kept."
            )
        self.written = written
        await self.journal.append(self.stream_id, event)
        if self.observe is not None:
            self.observe(self.stream_id, event)

    def take(self, event: Event) -> bool:
        """The sink: journal ``event`` now, unless the producer task must see it (the end,
        Stop, the size limit) or the journal cannot append without awaiting."""
        if event.terminal or self.cancel.is_cancelled():
            return False
        written = self._written_with(event)
        if written is None or not self.journal.append_nowait(self.stream_id, event):
            return False  # past the limit: the producer raises StreamTooLarge for it
        self.written = written
        if self.observe is not None:
            self.observe(self.stream_id, event)
        return True


@dataclass(slots=True)
class _Producing:
    """A stream produced by this process."""

    cancel: CancelToken
    task: asyncio.Task[None] | None = None
    readers: int = 0
    grace_timer: asyncio.TimerHandle | None = None
    done: bool = False
    owner: str | None = None
    #: Generates to its end with no reader: the disconnect policy does not apply.
    background: bool = False
    handed_over: bool = False
    #: The request being answered, where another replica could continue it (shared
    #: journals): SIGTERM hands such streams over instead of draining them.
    request: ChatRequest | None = None
    #: What ``start`` awaits (one loop step, where ``shield(accepted)`` took two).
    gate: asyncio.Future[None] | None = None


def _settle(p: _Producing, accepted: asyncio.Future[None], exc: BaseException | None) -> None:
    """Answer ``start``: ``accepted`` is the producer's record, ``gate`` the caller's."""
    for future in (accepted, p.gate):
        if future is not None and not future.done():
            future.set_result(None) if exc is None else future.set_exception(exc)


class StreamManager:
    def __init__(
        self,
        router: Router,
        journal: Journal,
        *,
        stages: list[Stage] | None = None,
        disconnect_grace: float = 30.0,
        observer: StreamObserver | None = None,
        max_stream_bytes: int = 0,
    ) -> None:
        self.router = router
        self.journal = journal
        #: Stop, readers and liveness across replicas; a no-op where nothing is shared.
        self.control: ControlPlane = journal.control
        self.stages = list(stages or [])
        self.max_stream_bytes = max_stream_bytes  # 0: no limit
        self.disconnect_grace = disconnect_grace
        self.observer = observer
        self._producing: dict[str, _Producing] = {}
        self._grace_checks: set[asyncio.Task[None]] = set()
        self._cancel_listener: asyncio.Task[None] | None = None
        #: Set on SIGTERM in a shared deployment: take nothing over, end local readers.
        self.handing_over = False
        if self.control.shared:
            self.control.on_orphan = self._take_over

    # -- lifecycle ---------------------------------------------------------------------

    async def start_background(self) -> None:
        await self.control.start()
        await self.journal.start()
        requests = self.control.cancel_requests()
        if requests is not None:
            self._cancel_listener = asyncio.create_task(self._listen_for_cancels(requests))

    async def close(self, *, reason: str = "shutdown") -> None:
        for stream_id in list(self._producing):
            self._cancel_local(stream_id, reason)
        tasks = [p.task for p in self._producing.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._cancel_listener is not None:
            self._cancel_listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cancel_listener
        await self.journal.close()  # flushes queued appends
        await self.control.close()

    @property
    def active_streams(self) -> int:
        return len(self._producing)

    def is_producing(self, stream_id: str) -> bool:
        """Whether this process is generating ``stream_id`` right now."""
        return stream_id in self._producing

    def active_streams_of(self, owner: str | None) -> int:
        """Streams this process is generating for ``owner`` (per-key concurrency limit)."""
        return sum(1 for p in self._producing.values() if p.owner == owner)

    def cancel_all(self, reason: str) -> int:
        """Cancel every stream generating here (graceful shutdown); returns how many."""
        ids = list(self._producing)
        for stream_id in ids:
            self._cancel_local(stream_id, reason)
        return len(ids)

    # -- start -------------------------------------------------------------------------

    async def start(
        self,
        request: ChatRequest,
        *,
        protocol: str,
        owner: str | None = None,
        render: dict[str, Any] | None = None,
        background: bool = False,
        labels: dict[str, str] | None = None,
    ) -> StreamMeta:
        """Start producing; returns once the backend accepted the request. A ``background``
        stream keeps generating with no reader (only Stop ends it early). ``render`` and
        ``labels`` are stored in its ``StreamMeta``.

        Raises the backend's ``RequestError`` (model not found, context too long, queue
        full) if it rejects the request before its first event.
        """
        backend = self.router.resolve(request.model)
        meta = StreamMeta(
            id=new_stream_id(),
            model=request.model,
            protocol=protocol,
            created=int(time.time()),
            owner=owner,
            render=dict(render or {}),
            labels=dict(labels or {}),
        )
        producing = _Producing(cancel=CancelToken(), owner=owner, background=background)
        if self.control.shared:
            # Kept with the stream, so another replica can continue it (takeover.py).
            meta.request = request.to_dict()
            continuable = continuable_request(meta)
            if continuable is not None and backend.continuation(continuable, "") is not None:
                producing.request = continuable  # SIGTERM hands it over (hand_over_all)
        loop = asyncio.get_running_loop()
        accepted, producing.gate = loop.create_future(), loop.create_future()
        self._producing[meta.id] = producing
        producing.task = asyncio.create_task(
            self._produce(meta, request, backend, producing, accepted),
            name=f"tokenwire-produce-{meta.id}",
        )
        try:
            await producing.gate
        except asyncio.CancelledError:
            # The caller went away while we waited for acceptance: nobody will read.
            self._cancel_local(meta.id, "disconnect")
            raise
        self._await_first_reader(meta.id, producing)
        return meta

    def _await_first_reader(self, stream_id: str, producing: _Producing) -> None:
        # A caller gone before its reader starts never "leaves": the first reader cancels this.
        if producing.readers or producing.done or producing.grace_timer or producing.background:
            return
        wait = max(self.disconnect_grace, _FIRST_READER_WAIT)
        loop = asyncio.get_running_loop()
        producing.grace_timer = loop.call_later(wait, self._grace_over, stream_id, producing)

    def _events(
        self, request: ChatRequest, backend: Backend, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        events = source = backend.stream(request, cancel)
        for stage in self.stages:
            events = stage(events, request, cancel)
            if events is not source and is_push_source(source):
                log.debug("stage %r wraps a push source: no fast path for this stream", stage)
                source = events
        return events

    async def _produce(
        self,
        meta: StreamMeta,
        request: ChatRequest,
        backend: Backend,
        producing: _Producing,
        accepted: asyncio.Future[None],
    ) -> None:
        cancel = producing.cancel
        if self.observer is not None:
            self.observer.stream_started(meta.id)  # TTFT counts from here
        try:
            events = self._events(request, backend, cancel)
        except Exception as exc:  # a backend or stage that fails before it iterates
            _settle(producing, accepted, exc)
            await self._finish(meta.id, producing, accepted, None)
            return
        terminal: Event | None = None
        try:
            try:
                first = await anext(events)
            except StopAsyncIteration:
                first = None
            except RequestError as exc:
                _settle(producing, accepted, exc)
                return
            except BaseException as exc:
                _settle(producing, accepted, exc)
                raise
            await self.control.produce(meta.id)
            await self.journal.create(meta)
            await self.journal.append(
                meta.id, StreamStarted(id=meta.id, model=meta.model, created=meta.created)
            )
            _settle(producing, accepted, None)
            terminal = await self._pump(meta.id, first, events, cancel)
        except (asyncio.CancelledError, Exception) as exc:
            terminal = self._ended_by(exc, meta.id, producing)
        finally:
            with contextlib.suppress(Exception):
                await aclose(events)
            await self._finish(meta.id, producing, accepted, terminal)

    @staticmethod
    def _ended_by(exc: BaseException, stream_id: str, producing: _Producing) -> Event | None:
        """The terminal event a producer that raised ``exc`` ends with (None: none, another
        replica produces the stream now and will end it)."""
        if isinstance(exc, asyncio.CancelledError):
            return StreamCancelled(reason=producing.cancel.reason or "shutdown")
        if isinstance(exc, StreamHandedOver):
            log.warning("stream %s was taken over by another replica", stream_id)
            producing.cancel.cancel("handed_over")
            producing.handed_over = True
            return None
        if isinstance(exc, TokenwireError):
            return StreamFailed(error=exc.to_dict())
        log.exception("stream %s failed", stream_id)
        error = {"type": "server_error", "message": f"internal error: {exc}", "code": None}
        return StreamFailed(error=error)

    async def _finish(
        self,
        stream_id: str,
        producing: _Producing,
        accepted: asyncio.Future[None],
        terminal: Event | None,
    ) -> None:
        """Journal the terminal event (exactly one, unless another replica took the stream
        over) and forget the stream."""
        cancel = producing.cancel
        if accepted.done() and terminal is None and cancel.is_cancelled():
            terminal = StreamCancelled(reason=cancel.reason or "stop")
        if accepted.done() and not accepted.exception() and not producing.handed_over:
            if terminal is None:
                message = "the backend ended the stream without finishing it"
                error = {"type": "backend_error", "message": message, "code": None}
                terminal = StreamFailed(error=error)
            try:
                await self.journal.append(stream_id, terminal)
            except Exception:
                log.exception("could not journal the terminal event of %s", stream_id)
        producing.done = True
        self.control.stopped_producing(stream_id)
        if self.observer is not None:
            self.observer.stream_ended(stream_id, terminal)
        if producing.grace_timer is not None:
            producing.grace_timer.cancel()
        self._producing.pop(stream_id, None)

    async def _pump(
        self, stream_id: str, first: Event | None, events: AsyncIterator[Event], cancel: CancelToken
    ) -> Event | None:
        """Append events until the backend finishes or is cancelled; return the terminal."""
        appender = _Appender(
            stream_id,
            self.journal,
            cancel,
            self.max_stream_bytes,
            self.observer.event_appended if self.observer is not None else None,
        )
        if is_push_source(events):  # not when a stage wraps it (see ``_events``)
            if self.journal.appends_nowait:
                events.push_to(appender.take)
            else:
                log.debug("the journal cannot append without awaiting: no fast path")
        append = appender.append
        event = first
        while event is not None:
            if cancel.is_cancelled():
                return StreamCancelled(reason=cancel.reason or "stop")
            if event.terminal:
                return event
            await append(event)
            try:
                event = await anext(events)
            except StopAsyncIteration:
                event = None
        if cancel.is_cancelled():
            return StreamCancelled(reason=cancel.reason or "stop")
        return None

    # -- takeover and handover (takeover.py) ----------------------------------------------

    async def _take_over(self, stream_id: str) -> bool:
        """The control plane's orphan handler: claim ``stream_id`` and continue it here if
        it can be continued. True: taken care of (continued here or by another replica)."""
        if stream_id in self._producing or self.handing_over:
            return True  # ours already; or shutting down: another replica's sweep takes it
        try:
            meta = await self.journal.meta(stream_id)
            request = continuable_request(meta)
            backend = self.router.resolve(request.model) if request is not None else None
        except TokenwireError:  # gone, or a model this replica does not serve
            return False
        if request is None or backend is None or backend.continuation(request, "") is None:
            return False
        claim = await self.control.claim(stream_id)
        if claim is None:
            return False  # someone else has it (the caller then finds it alive) or it ended
        producing = _Producing(cancel=CancelToken(), owner=meta.owner, request=request)
        self._producing[stream_id] = producing
        producing.task = asyncio.create_task(
            self._continue(meta, claim, request, backend, producing),
            name=f"tokenwire-continue-{stream_id}",
        )
        self._await_first_reader(stream_id, producing)
        return True

    async def _continue(
        self,
        meta: StreamMeta,
        claim: Claim,
        request: ChatRequest,
        backend: Backend,
        producing: _Producing,
    ) -> None:
        """Produce the rest of a claimed stream: the same log, seq from ``claim.next_seq``."""
        cancel = producing.cancel
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        accepted.set_result(None)
        terminal: Event | None = None
        events: AsyncIterator[Event] | None = None
        try:
            self.journal.resume_producing(meta.id, claim.next_seq, meta)
            continued = continuation(request, backend, await self.journal.snapshot(meta.id))
            if continued is None:
                terminal = producer_lost("its producer stopped inside a tool call")
                return
            await self.journal.append(meta.id, takeover_progress(claim.previous))
            events = self._events(continued, backend, cancel)
            terminal = await self._pump(meta.id, await anext(events, None), events, cancel)
        except (asyncio.CancelledError, Exception) as exc:
            terminal = self._ended_by(exc, meta.id, producing)
        finally:
            if events is not None:
                with contextlib.suppress(Exception):
                    await aclose(events)
            await self._finish(meta.id, producing, accepted, terminal)

    async def hand_over_all(self) -> int:
        """SIGTERM in a shared deployment: stop producing every stream another replica can
        continue, without a terminal event, and release it so one takes it at once; local
        readers end without a terminal (their clients resume elsewhere). Returns how many."""
        self.handing_over = True
        handed = {i: p for i, p in self._producing.items() if p.request is not None and not p.done}
        for producing in handed.values():
            producing.handed_over = True
            producing.cancel.cancel("handed_over")
        if tasks := [p.task for p in handed.values() if p.task is not None]:
            await asyncio.wait(tasks, timeout=5.0)
        for stream_id in handed:
            with contextlib.suppress(TokenwireError):  # else claimed once its beat lapses
                await self.control.release(stream_id)
        return len(handed)

    # -- read --------------------------------------------------------------------------

    async def meta(self, stream_id: str) -> StreamMeta:
        return await self.journal.meta(stream_id)

    async def snapshot(self, stream_id: str) -> list[Event]:
        """The events journaled so far, without waiting for more."""
        return await self.journal.snapshot(stream_id)

    async def delete(self, stream_id: str) -> None:
        """Forget a finished stream (``Journal.delete``)."""
        await self.journal.delete(stream_id)

    async def read(self, stream_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Events after ``after``, replay then live, until the terminal event.

        While any reader is open the stream keeps generating; when the last one leaves
        before the end, the disconnect policy applies.
        """
        producing = self._reader_joined(stream_id)
        try:
            async for event in self.journal.read(stream_id, after):
                yield event
                if self.handing_over and stream_id not in self._producing:
                    return  # no terminal: the client resumes on another replica
        finally:
            self._reader_gone(stream_id, producing)

    async def read_batches(
        self, stream_id: str, after: int = -1, *, direct: Deliver | None = None
    ) -> AsyncIterator[list[Event]]:
        """As ``read``, in batches of the events already journaled: a reader that fell
        behind (a fast upstream) writes them to its client in one send, not one each.
        ``direct``: see ``Journal.read_batches``."""
        producing = self._reader_joined(stream_id)
        try:
            async for batch in self.journal.read_batches(stream_id, after, direct=direct):
                yield batch
                if self.handing_over and stream_id not in self._producing:
                    return  # no terminal: the client resumes on another replica
        finally:
            self._reader_gone(stream_id, producing)

    def _reader_joined(self, stream_id: str) -> _Producing | None:
        producing = self._producing.get(stream_id)
        if producing is not None:
            producing.readers += 1
            if producing.grace_timer is not None:
                producing.grace_timer.cancel()
                producing.grace_timer = None
        return producing

    def _reader_gone(self, stream_id: str, producing: _Producing | None) -> None:
        if producing is not None:
            producing.readers -= 1
            if producing.readers == 0 and not producing.done and not producing.background:
                self._reader_left(stream_id, producing)

    def _reader_left(self, stream_id: str, producing: _Producing) -> None:
        if self.disconnect_grace <= 0 and not self.control.shared:
            self._cancel_local(stream_id, "disconnect")
            return
        loop = asyncio.get_running_loop()
        producing.grace_timer = loop.call_later(
            max(self.disconnect_grace, 0.0), self._grace_over, stream_id, producing
        )

    def _grace_over(self, stream_id: str, producing: _Producing) -> None:
        producing.grace_timer = None
        if producing.readers > 0 or producing.done:
            return
        if not self.control.shared:
            self._cancel_local(stream_id, "disconnect")
            return
        # Readers may have resumed on another replica: ask the control plane first.
        task = asyncio.create_task(self._check_remote_readers(stream_id, producing))
        self._grace_checks.add(task)
        task.add_done_callback(self._grace_checks.discard)

    async def _check_remote_readers(self, stream_id: str, producing: _Producing) -> None:
        try:
            seen: float | None = await self.control.reader_seen(stream_id)
        except TokenwireError:
            seen = time.time() + 1.0  # the store is unreachable: no news is no verdict
        if producing.readers > 0 or producing.done or producing.grace_timer is not None:
            return
        left_for = time.time() - seen if seen is not None else math.inf
        if left_for < self.disconnect_grace or left_for < 0:
            # left_for < 0: a reader holds a presence lease right now; look again soon.
            wait = self.disconnect_grace - left_for if left_for >= 0 else 1.0
            producing.grace_timer = asyncio.get_running_loop().call_later(
                max(wait, 0.2), self._grace_over, stream_id, producing
            )
            return
        self._cancel_local(stream_id, "disconnect")

    # -- cancel ------------------------------------------------------------------------

    async def cancel(self, stream_id: str, reason: str = "stop") -> None:
        """Stop generation of ``stream_id`` wherever it runs. Idempotent."""
        if self._cancel_local(stream_id, reason):
            return
        await self.journal.meta(stream_id)  # raises StreamNotFound / StreamExpired
        await self.control.signal_cancel(stream_id, reason)

    def _cancel_local(self, stream_id: str, reason: str) -> bool:
        producing = self._producing.get(stream_id)
        if producing is None:
            return False
        # Backends watch the token themselves (between tokens, and while queued or
        # waiting on an upstream), so setting it is all a local cancel takes.
        producing.cancel.cancel(reason)
        return True

    async def _listen_for_cancels(self, requests: AsyncIterator[tuple[str, str]]) -> None:
        async for stream_id, reason in requests:
            self._cancel_local(stream_id, reason)
