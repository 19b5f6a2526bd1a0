"""Per-request and per-stream limits the server applies around ``StreamManager.start``.

- ``max_tokens_limit``: a request asking for more is **clamped** to the limit (and one asking
  for nothing gets the limit), rather than refused: clients such as Anthropic's require
  ``max_tokens`` and habitually send large values; ``finish_reason: "length"`` tells them
  where the answer stopped. Documented in docs/guarantees.md.
- ``max_streams_per_key``: streams one key may have generating at once in this process;
  beyond it a 429 with ``Retry-After``. Checked and registered without an ``await`` in
  between, so concurrent starts cannot overshoot.
- ``max_stream_bytes`` (the journal bytes one stream may write) is the stream manager's own
  (``StreamManager(max_stream_bytes=…)``): it appends every event, so it counts them.
"""

from __future__ import annotations

from tokenwire.errors import Overloaded
from tokenwire.requests import ChatRequest

__all__ = ["check_concurrency", "clamp_max_tokens"]


def clamp_max_tokens(request: ChatRequest, limit: int) -> None:
    if limit <= 0:
        return
    wanted = request.sampling.max_tokens
    if wanted is None or wanted > limit:
        request.sampling.max_tokens = limit


def check_concurrency(active: int, limit: int) -> None:
    if 0 < limit <= active:
        raise Overloaded(
            f"Too many concurrent streams for this key: at most {limit} may generate at once.",
            retry_after=1.0,
            code="too_many_streams",
        )
