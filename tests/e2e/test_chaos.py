"""Chaos, bounded: three replicas behind nginx on Redis with Sentinel, 32 concurrent streams
(embedded model at temperature 0, scripted upstream), client drops and resumes, a replica
SIGKILL and restart, a Redis master failover, a Redis restart, a rolling SIGTERM restart
(tests/e2e/chaos.py). ``benchmarks/soak.py`` runs the same for longer.
"""

from __future__ import annotations

import pytest

from ..conftest import ARTIFACTS
from .chaos import ChaosSettings, run_chaos, summary

pytestmark = pytest.mark.e2e

#: Outcomes allowed until takeover (issue 18 items 1-2) lands: a stream whose replica is
#: SIGKILLed ends ``producer_lost``; one whose replica is restarted (SIGTERM) is drained for
#: ``--drain-timeout`` and then ends ``cancelled:shutdown``. Redis faults end nothing.
ALLOWED = {"completed", "failed:producer_lost", "cancelled:shutdown"}


@pytest.mark.timeout(480)
def test_every_stream_ends_once_with_nothing_lost_or_repeated_through_chaos() -> None:
    report = run_chaos(ChaosSettings())
    text = summary(report)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "chaos-summary.txt").write_text(text + "\n")
    print(text)
    assert not report.problems, text
    assert set(report.outcomes) <= ALLOWED, text
    assert report.outcomes["completed"] >= report.streams // 2, text
    assert report.faults["Redis master failover"] == 1 and report.faults["Redis restart"]
    assert report.faults["replica SIGTERM (rolling)"] == 3 and report.faults["replica SIGKILL"]
    assert report.drops > 0 and report.embedded_identical > 0, text
