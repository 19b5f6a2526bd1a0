"""Settings the embedded engine measures at load instead of guessing: threads, batch split.

The best settings differ between CPUs (an Ice Lake Xeon and an EPYC disagree on both), so
the engine times throwaway decode steps on its own thread at load and picks:

- ``pick_threads``: how many ggml threads make a step fastest. Candidates are timed in
  interleaved rounds and judged by their median, so a machine that is busy at load time
  (other processes on the cores) pushes the choice toward fewer threads; among candidates
  within 5 % of the best, the fewest win (a spare core serves HTTP).
- ``pick_split``: from how many sequences one batched step beats one step per sequence.

``--threads`` / ``--threads-batch`` skip the thread measurement.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

__all__ = ["pick_split", "pick_threads", "thread_candidates"]

#: A candidate this close to the fastest counts as a tie; fewer threads win ties.
TIE = 1.05
#: A candidate this many times slower than the best so far is not timed further.
DROP = 3.0


def thread_candidates() -> list[int]:
    """1, 2, 4, … up to the cores this process may run on, and that number itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    candidates = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= cores]
    if cores not in candidates:
        candidates.append(cores)
    return candidates


def pick_threads(
    step: Callable[[], float],
    use: Callable[[int], None],
    candidates: list[int],
    rounds: int = 5,
) -> tuple[int, dict[int, float]]:
    """The thread count whose ``step()`` (seconds) is fastest, and each candidate's median.

    ``use(n)`` switches the context to ``n`` threads. Each candidate is warmed up once (ggml
    starts its worker threads on first use), then timed ``rounds`` times, interleaved. A
    candidate over ``DROP`` times the best so far is dropped after its warm-up or any round:
    on a busy machine a step with one thread per core can take seconds (its threads wait at
    every barrier for a descheduled peer), and loading must not wait for all of its rounds.
    """
    times: dict[int, list[float]] = {}
    for n in candidates:
        use(n)
        times[n] = [step()]  # the warm-up: judged for dropping, not kept in the median
    _drop_slow(times)
    for n in times:
        times[n].clear()
    for _ in range(rounds):
        for n in list(times):
            use(n)
            times[n].append(step())
        _drop_slow(times)
    cost = {n: statistics.median(samples) for n, samples in times.items()}
    fastest = min(cost.values())
    chosen = min(n for n in cost if cost[n] <= fastest * TIE)
    return chosen, cost


def _drop_slow(times: dict[int, list[float]]) -> None:
    """Remove the candidates whose median so far is over ``DROP`` times the best's."""
    medians = {n: statistics.median(samples) for n, samples in times.items() if samples}
    if not medians:
        return
    best = min(medians.values())
    for n, median in medians.items():
        if median > best * DROP:
            del times[n]


def pick_split(cost: Callable[[int], float], n_parallel: int) -> int:
    """The smallest number of sequences for which one batched decode step (``cost(n)``
    seconds for ``n`` tokens) beats ``n`` one-token steps; ``n_parallel + 1``: never.

    Some ggml CPU kernels gain nothing from a few extra tokens: with Q8_0 weights a step of
    2 tokens took 4x a step of 1 on one machine, with Q4_1 2.6x
    (benchmarks/decode_kernels.py).
    """
    sizes = [n for n in (1, 2, 4, 8) if n <= n_parallel]
    if n_parallel not in sizes:
        sizes.append(n_parallel)
    cost(sizes[-1])  # warm-up: buffers, threads
    best = {n: min(cost(n) for _ in range(2)) for n in sizes}
    for n in sizes[1:]:
        if best[n] < n * best[1]:
            return n
    return n_parallel + 1
