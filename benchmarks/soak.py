"""Soak: the chaos scenario of tests/e2e/test_chaos.py, longer and bigger, reporting counts.

Three replicas behind nginx on Redis with Sentinel; streams on the embedded model
(temperature 0) and on a scripted upstream; client drops and resumes; per cycle a replica
SIGKILL + restart, a Redis master failover, a Redis restart (AOF) and a rolling SIGTERM
restart. Reports streams, faults injected, outcomes (completed / failed with reason /
cancelled with reason), how many embedded answers were identical to an uninterrupted run, and
every problem found (a gap, a repeat, a second terminal, a replay that differs).

    .venv/bin/python benchmarks/soak.py                 # 4 cycles, 200 streams
    .venv/bin/python benchmarks/soak.py --cycles 1 --streams 40   # quick

Writes results/soak.json and results/soak.md. Needs redis-server, redis-sentinel, nginx
(scripts/install-system-deps.sh) and the dev install (it reuses the test harness).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.chaos import ChaosSettings, run_chaos, summary  # noqa: E402

from _common import write_results  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=4, help="fault cycles (4)")
    parser.add_argument("--streams", type=int, default=200, help="streams in all (200)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    embedded = max(1, args.streams // 5)
    settings = ChaosSettings(
        embedded_streams=embedded,
        upstream_streams=args.streams - embedded,
        # Faults take ~40 s a cycle: spread the starts over all of them.
        launch_over=40.0 * args.cycles,
        cycles=args.cycles,
        seed=args.seed,
        deadline=120.0 + 60.0 * args.cycles,
    )
    report = run_chaos(settings)
    text = summary(report)
    write_results("soak", report.to_dict(), "# Soak\n\n```\n" + text + "\n```\n")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
