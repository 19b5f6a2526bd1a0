"""What the embedded engine measures at load: the choice logic, on scripted step times, and
the real engine's choice (threads measured on its own thread when no flag gives them)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from tokenwire.backends.llamacpp.calibration import pick_split, pick_threads, thread_candidates


def scripted(
    costs: dict[int, float],
) -> tuple[Callable[[], float], Callable[[int], None], list[int]]:
    """A step whose time depends on the thread count last passed to ``use``; and the log of
    thread counts each step ran with."""
    current = [0]
    ran: list[int] = []

    def use(n: int) -> None:
        current[0] = n

    def step() -> float:
        ran.append(current[0])
        return costs[current[0]]

    return step, use, ran


def test_the_fastest_thread_count_wins() -> None:
    step, use, _ = scripted({1: 0.020, 2: 0.012, 4: 0.014})
    chosen, cost = pick_threads(step, use, [1, 2, 4])
    assert chosen == 2
    assert cost == {1: 0.020, 2: 0.012, 4: 0.014}


def test_a_near_tie_goes_to_fewer_threads() -> None:
    step, use, _ = scripted({1: 0.0100, 2: 0.0098})
    assert pick_threads(step, use, [1, 2])[0] == 1


def test_a_candidate_far_slower_is_dropped_after_its_warm_up() -> None:
    # A busy machine: two threads wait at every barrier for a descheduled peer.
    step, use, ran = scripted({1: 0.015, 2: 4.0})
    chosen, cost = pick_threads(step, use, [1, 2], rounds=5)
    assert chosen == 1 and 2 not in cost
    assert ran.count(2) == 1  # its warm-up only
    assert ran.count(1) == 6


def test_the_split_is_where_a_batched_step_beats_one_step_per_sequence() -> None:
    # 2 tokens in one step cost 4x one token: batching pays only from 4 sequences.
    costs = {1: 1.0, 2: 4.0, 4: 3.5, 8: 5.0}
    assert pick_split(lambda n: costs[n], 8) == 4
    assert pick_split(lambda n: float(n) * 2, 8) == 9  # never


def test_candidates_run_from_one_to_every_core() -> None:
    candidates = thread_candidates()
    assert candidates[0] == 1 and candidates == sorted(set(candidates))
    assert max(candidates) == len(os.sched_getaffinity(0))


@pytest.mark.timeout(300)
def test_the_engine_measures_threads_on_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --threads the engine times each candidate, and every llama.cpp call that
    computes (calibration included) runs on the engine thread: ggml's OpenMP keeps worker
    threads per calling thread, and more of them than cores makes its barriers sleep."""
    import asyncio

    from tokenwire.backends.llamacpp import LlamaCppBackend
    from tokenwire.backends.llamacpp import engine as engine_module

    callers: set[str] = set()
    original = engine_module.BatchEngine._throwaway

    def throwaway(self: engine_module.BatchEngine, n: int, steps: int = 1) -> float:
        callers.add(threading.current_thread().name)
        return original(self, n, steps)

    monkeypatch.setattr(engine_module.BatchEngine, "_throwaway", throwaway)

    async def load() -> tuple[int | None, int | None, dict[str, dict[int, float]]]:
        backend = LlamaCppBackend(parallel=2, warmup=False)
        await backend.start()
        try:
            engine = backend._engine
            assert engine is not None
            return backend.n_threads, backend.n_threads_batch, engine.thread_costs
        finally:
            await backend.close()

    threads, batch_threads, costs = asyncio.run(load())
    assert callers == {"tokenwire-decode"}
    assert threads in thread_candidates() and batch_threads in thread_candidates()
    assert threads in costs["decode"] and batch_threads in costs["batch"]
    assert set(costs["decode"]) <= set(thread_candidates())
