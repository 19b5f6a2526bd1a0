"""Client-side latency metrics of one stream, measured where the user sits.

Definitions follow vLLM's serving benchmark, so numbers from ``stream.metrics`` and from
``tokenwire bench`` compare with published ones:

- TTFT: from sending the request to the first text (or tool-call) chunk;
- ITL (inter-token latency): the gaps between successive chunks after the first;
- TPOT (time per output token): ``(e2e - ttft) / (output_tokens - 1)``;
- E2E latency: from sending the request to the terminal event;
- tokens/s: decode speed, ``(output_tokens - 1) / (last chunk - first chunk)``.

``output_tokens`` is the server's ``usage.completion_tokens`` when it sent one, else the
number of chunks (one token per chunk on servers that do not coalesce). Time spent waiting to
reconnect after a drop is counted, not hidden: it is what the user waited.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["StreamMetrics", "percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


@dataclass(slots=True)
class StreamMetrics:
    """Timestamps (``time.perf_counter`` seconds) of one stream and what follows from them."""

    started_at: float = field(default_factory=time.perf_counter)
    chunk_times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    #: ``usage.completion_tokens`` from the server, when it sent one.
    server_tokens: int | None = None
    reconnects: int = 0

    # -- recording (called by the stream) ---------------------------------------------------

    def chunk(self, now: float | None = None) -> None:
        self.chunk_times.append(time.perf_counter() if now is None else now)

    def end(self, now: float | None = None) -> None:
        if self.ended_at is None:
            self.ended_at = time.perf_counter() if now is None else now

    # -- derived ---------------------------------------------------------------------------

    @property
    def output_tokens(self) -> int:
        if self.server_tokens is not None:
            return self.server_tokens
        return len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        """Seconds from request to first chunk."""
        return self.chunk_times[0] - self.started_at if self.chunk_times else None

    @property
    def ttft_ms(self) -> float | None:
        return _ms(self.ttft)

    @property
    def itl(self) -> list[float]:
        """Seconds between successive chunks."""
        times = self.chunk_times
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def itl_p50_ms(self) -> float | None:
        return _ms(percentile(self.itl, 50))

    @property
    def itl_p99_ms(self) -> float | None:
        return _ms(percentile(self.itl, 99))

    @property
    def e2e(self) -> float | None:
        """Seconds from request to the terminal event (None while running)."""
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def e2e_ms(self) -> float | None:
        return _ms(self.e2e)

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first, as vLLM defines it."""
        e2e, ttft, tokens = self.e2e, self.ttft, self.output_tokens
        if e2e is None or ttft is None or tokens < 2:
            return None
        return (e2e - ttft) / (tokens - 1)

    @property
    def tpot_ms(self) -> float | None:
        return _ms(self.tpot)

    @property
    def tokens_per_second(self) -> float | None:
        times = self.chunk_times
        tokens = self.output_tokens
        if len(times) < 2 or tokens < 2 or times[-1] <= times[0]:
            return None
        return (tokens - 1) / (times[-1] - times[0])

    def summary(self) -> str:
        """One line for humans: ``TTFT 62 ms · 118.4 tok/s · 57 tokens``."""
        parts = []
        if self.ttft_ms is not None:
            parts.append(f"TTFT {self.ttft_ms:.0f} ms")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tok/s")
        parts.append(f"{self.output_tokens} tokens")
        if self.reconnects:
            parts.append(f"{self.reconnects} reconnect{'s' if self.reconnects > 1 else ''}")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "ttft_ms": self.ttft_ms,
            "itl_p50_ms": self.itl_p50_ms,
            "itl_p99_ms": self.itl_p99_ms,
            "tpot_ms": self.tpot_ms,
            "e2e_ms": self.e2e_ms,
            "tokens_per_second": self.tokens_per_second,
            "output_tokens": self.output_tokens,
            "reconnects": self.reconnects,
        }
