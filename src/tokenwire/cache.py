"""Response cache: a finished stream is a replayable log.

A deterministic request (temperature 0 or a fixed seed) that matches one already answered —
same model, messages, tools, response format and sampling parameters — is answered by
replaying the cached events as a new stream (new id, its own seq numbers, resumable like
any other), instantly or paced like the original. The model is not called.

Promises:
- only streams that ended with ``stream.completed`` are stored; cancelled or failed ones,
  and ones whose consumer went away, never are;
- entries expire after ``ttl`` seconds and the cache holds at most ``max_entries`` streams
  and ``max_events`` events (least recently used leave first);
- mode ``off`` (the default) disables it, ``deterministic`` caches only temperature-0 or
  seeded requests, ``all`` also caches sampled ones (a replay is then one possible sample);
- the lookup is a decision made once, before the stream starts (``lookup``): the server
  makes it when it admits a request, records it as stream metadata (``StreamMeta.labels``
  ``cache``: ``hit`` or ``miss``, sent as the ``X-Tokenwire-Cache`` header, on resumes
  too) and hands it down to the stage with the request (``request.extra[CACHE_LOOKUP_KEY]``,
  the same way protocols hand options to stages). Nothing flows back up through the request.
  A stage with no decision handed down (a ``StreamManager`` used directly) looks up itself.

The server runs it after the validating stages (tools, structured output, guards), so only a
stream they let complete is stored and a hit skips them with the backend, and before the
delivery stages (coalescing), which apply to replays too. It stores content events only, not
queue or prefill progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import orjson

from tokenwire.cancel import CancelToken
from tokenwire.events import Event, Progress, StreamCompleted, Usage
from tokenwire.requests import ChatRequest

__all__ = ["CACHE_LOOKUP_KEY", "CacheLookup", "CacheMode", "ReplayMode", "ResponseCache"]

CacheMode = Literal["off", "deterministic", "all"]
ReplayMode = Literal["instant", "paced"]

#: Where the server hands its ``lookup`` (a ``CacheLookup`` or None) down to the stage.
CACHE_LOOKUP_KEY = "tokenwire_cache"
#: Request options that change delivery, not content: never part of the key.
_DELIVERY_KEYS = frozenset({CACHE_LOOKUP_KEY, "coalesce"})


@dataclass(slots=True)
class _Entry:
    events: list[tuple[float, Event]]  # (seconds since the request started, event)
    stored_at: float


@dataclass(slots=True, frozen=True)
class CacheLookup:
    """The answer for one cacheable request: its key, and the entry to replay (a hit) or
    None (a miss: the stream is recorded under ``key``)."""

    key: str
    entry: _Entry | None

    @property
    def status(self) -> str:
        return "hit" if self.entry is not None else "miss"


class ResponseCache:
    def __init__(
        self,
        *,
        mode: CacheMode = "deterministic",
        ttl: float = 600.0,
        max_entries: int = 1000,
        max_events: int = 200_000,
        replay: ReplayMode = "instant",
        on_lookup: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("off", "deterministic", "all"):
            raise ValueError(f"cache mode must be off, deterministic or all, not {mode!r}")
        if replay not in ("instant", "paced"):
            raise ValueError(f"cache replay must be instant or paced, not {replay!r}")
        self.mode = mode
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_events = max_events
        self.replay = replay
        self.on_lookup = on_lookup
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._events = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- keys ------------------------------------------------------------------------------

    def cacheable(self, request: ChatRequest) -> bool:
        if self.mode == "off":
            return False
        if self.mode == "all":
            return True
        sampling = request.sampling
        return sampling.temperature == 0 or sampling.seed is not None

    @staticmethod
    def key(request: ChatRequest) -> str:
        data = dataclasses.asdict(request)
        data.pop("include_usage", None)  # rendering only
        data["extra"] = {k: v for k, v in data["extra"].items() if k not in _DELIVERY_KEYS}
        blob = orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        return hashlib.blake2b(blob, digest_size=20).hexdigest()

    # -- storage ---------------------------------------------------------------------------

    def get(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry.stored_at >= self.ttl:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, events: list[tuple[float, Event]]) -> None:
        if len(events) > self.max_events or self.max_entries <= 0:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(events=events, stored_at=self.clock())
        self._events += len(events)
        while len(self._entries) > self.max_entries or self._events > self.max_events:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._events -= len(entry.events)

    def clear(self) -> None:
        self._entries.clear()
        self._events = 0

    # -- the stage -------------------------------------------------------------------------

    def lookup(self, request: ChatRequest) -> CacheLookup | None:
        """Decide how ``request`` is answered: None when it is not cacheable, else its key
        and the entry to replay, if any. Counted once (``on_lookup``)."""
        if not self.cacheable(request):
            if self.on_lookup is not None and self.mode != "off":
                self.on_lookup("skip")
            return None
        key = self.key(request)
        found = CacheLookup(key=key, entry=self.get(key))
        if self.on_lookup is not None:
            self.on_lookup(found.status)
        return found

    def stage(
        self, events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        if CACHE_LOOKUP_KEY in request.extra:
            found: CacheLookup | None = request.extra[CACHE_LOOKUP_KEY]
        else:
            found = self.lookup(request)
        if found is None:
            return events
        if found.entry is not None:
            return self._replay(found.entry, events, cancel)
        return self._record(found.key, events, cancel)

    async def _record(
        self, key: str, events: AsyncIterator[Event], cancel: CancelToken
    ) -> AsyncIterator[Event]:
        started = self.clock()
        recorded: list[tuple[float, Event]] = []
        async for event in events:
            if not isinstance(event, Progress):  # queue and prefill steps are not content
                recorded.append((self.clock() - started, dataclasses.replace(event)))
            if isinstance(event, StreamCompleted) and not cancel.is_cancelled():
                self.put(key, recorded)
            yield event

    async def _replay(
        self, entry: _Entry, events: AsyncIterator[Event], cancel: CancelToken
    ) -> AsyncIterator[Event]:
        # The backend's generator was never started; close it so it holds nothing.
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
        started = self.clock()
        first_text_at: float | None = None
        yield Progress(stage="cache", message="replaying a cached response")
        for offset, event in entry.events:
            if cancel.is_cancelled():
                return
            if self.replay == "paced":
                wait = offset - (self.clock() - started)
                if wait > 0:
                    await asyncio.sleep(wait)
            copy = dataclasses.replace(event, seq=-1)
            if isinstance(copy, Usage):
                ttft = first_text_at if first_text_at is not None else self.clock() - started
                copy.ttft_ms = round(ttft * 1000, 2)
            elif first_text_at is None and event.type == "text.delta":
                first_text_at = self.clock() - started
            yield copy
