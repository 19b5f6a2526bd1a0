"""Prometheus metrics for ``GET /metrics`` (prometheus-client, text exposition format).

``Metrics`` is a ``StreamObserver``: the stream manager calls it as events are appended,
so every stream, whatever protocol or transport reads it, is measured once at the source.
What it promises:

- ``tokenwire_ttft_seconds``: request accepted → first ``text.delta`` appended (histogram);
- ``tokenwire_inter_token_seconds``: gap between consecutive ``text.delta`` events;
- ``tokenwire_tokens_out_total`` (completion tokens from ``usage``), ``tokenwire_deltas_total``;
- ``tokenwire_streams_active`` / ``tokenwire_streams_queued`` (gauges read at scrape time);
- ``tokenwire_streams_total{outcome}``, ``tokenwire_cancels_total{reason}``,
  ``tokenwire_resumes_total``, ``tokenwire_errors_total{type,where}``;
- ``tokenwire_journal_streams`` / ``tokenwire_journal_events`` (the journal's ``stats()``);
- ``tokenwire_cache_lookups_total{result}`` when a response cache is configured.

Each app has its own ``CollectorRegistry`` (several apps in one test process must not clash).
Per-token cost: one dict lookup, one ``perf_counter`` and one histogram observe, which for
the two per-token histograms is a bisect and a list increment (``LoopHistogram``: no lock,
as only the event loop observes; prometheus-client's ``observe`` takes a lock per call).
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily

from tokenwire.events import Event, StreamCancelled, StreamFailed, TextDelta, Usage

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopHistogram:
    """A histogram observed from the event loop only: ``observe`` is a bisect and a list
    increment, with no lock. Exposed like prometheus-client's (``_bucket``, ``_count``,
    ``_sum``) through ``collect()``."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: +Inf
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # le: upper bounds inclusive
        self._sum += value

    def collect(self) -> list[HistogramMetricFamily]:
        cumulative = list(itertools.accumulate(self._counts))
        les = [*(repr(b) for b in self._bounds), "+Inf"]  # as prometheus-client writes them
        return [
            HistogramMetricFamily(
                self.name,
                self.documentation,
                buckets=list(zip(les, cumulative, strict=True)),
                sum_value=self._sum,
            )
        ]


class Metrics:
    """All of tokenwire's metrics in one registry; also the stream manager's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = LoopHistogram(
            "tokenwire_ttft_seconds",
            "Time from request acceptance to the first text delta.",
            TTFT_BUCKETS,
            r,
        )
        self.inter_token = LoopHistogram(
            "tokenwire_inter_token_seconds",
            "Time between consecutive text deltas of one stream.",
            ITL_BUCKETS,
            r,
        )
        self.tokens_out = Counter(
            "tokenwire_tokens_out", "Completion tokens generated (from usage).", registry=r
        )
        self.deltas = Counter("tokenwire_deltas", "Text delta events appended.", registry=r)
        self._deltas = 0  # not yet added to ``deltas``
        self.streams = Counter(
            "tokenwire_streams", "Streams ended, by outcome.", ["outcome"], registry=r
        )
        self.cancels = Counter(
            "tokenwire_cancels", "Streams cancelled, by reason.", ["reason"], registry=r
        )
        self.resumes = Counter(
            "tokenwire_resumes", "Reads of an existing stream (resume / fan-out).", registry=r
        )
        self.errors = Counter(
            "tokenwire_errors",
            "Errors by type; where=request (4xx/5xx before a stream) or stream (stream.failed).",
            ["type", "where"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "tokenwire_cache_lookups", "Response cache lookups, by result.", ["result"], registry=r
        )
        self.active = Gauge(
            "tokenwire_streams_active", "Streams being produced by this process.", registry=r
        )
        self.queued = Gauge(
            "tokenwire_streams_queued", "Requests waiting for a model slot.", registry=r
        )
        self.journal_streams = Gauge(
            "tokenwire_journal_streams", "Streams held by the journal.", registry=r
        )
        self.journal_events = Gauge(
            "tokenwire_journal_events", "Events held by the journal.", registry=r
        )
        # stream id -> [accepted_at, last_delta_at or 0.0]
        self._clocks: dict[str, list[float]] = {}

    # -- gauges read at scrape time ---------------------------------------------------------

    def bind(
        self,
        *,
        active: Callable[[], float],
        queued: Callable[[], float],
        journal_stats: Callable[[], dict[str, int]],
    ) -> None:
        self.active.set_function(active)
        self.queued.set_function(queued)
        self.journal_streams.set_function(lambda: journal_stats().get("streams", 0))
        self.journal_events.set_function(lambda: journal_stats().get("events", 0))

    def render(self) -> bytes:
        self._flush_deltas()
        return generate_latest(self.registry)

    def _flush_deltas(self) -> None:
        # Counted in a plain int per token (prometheus' inc takes a lock), added here.
        if self._deltas:
            self.deltas.inc(self._deltas)
            self._deltas = 0

    # -- StreamObserver ---------------------------------------------------------------------

    def stream_started(self, stream_id: str) -> None:
        self._clocks[stream_id] = [time.perf_counter(), 0.0]

    def event_appended(self, stream_id: str, event: Event) -> None:
        if type(event) is TextDelta:
            clock = self._clocks.get(stream_id)
            if clock is None:
                return
            now = time.perf_counter()
            if clock[1]:
                self.inter_token.observe(now - clock[1])
            else:
                self.ttft.observe(now - clock[0])
            clock[1] = now
            self._deltas += 1
        elif type(event) is Usage:
            self.tokens_out.inc(event.completion_tokens)

    def stream_ended(self, stream_id: str, terminal: Event | None) -> None:
        self._clocks.pop(stream_id, None)
        self._flush_deltas()
        if isinstance(terminal, StreamCancelled):
            self.streams.labels("cancelled").inc()
            self.cancels.labels(terminal.reason).inc()
        elif isinstance(terminal, StreamFailed):
            self.streams.labels("failed").inc()
            self.errors.labels(str(terminal.error.get("type", "unknown")), "stream").inc()
        elif terminal is not None:
            self.streams.labels("completed").inc()

    # -- other hooks ------------------------------------------------------------------------

    def request_error(self, error_type: str) -> None:
        self.errors.labels(error_type, "request").inc()

    def resumed(self) -> None:
        self.resumes.inc()

    def cache_lookup(self, result: str) -> None:
        self.cache_lookups.labels(result).inc()


def queued_in(backends: list[Any]) -> Callable[[], float]:
    """Sum of requests waiting in every backend that admits through a ``FairQueue``."""
    from tokenwire.admission import FairQueue

    queues = [q for b in backends if isinstance(q := getattr(b, "queue", None), FairQueue)]

    def queued() -> float:
        return float(sum(q.waiting for q in queues))

    return queued
