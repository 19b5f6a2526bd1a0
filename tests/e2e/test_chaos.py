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

#: Outcomes allowed, by kind. Embedded streams (no tools) are taken over when their replica
#: is SIGKILLed or handed over on SIGTERM (issue 18 items 1-2): they always complete. Upstream
#: streams cannot be continued (the scripted upstream is a plain OpenAI-compatible server, no
#: assistant prefill): a SIGKILL ends them ``producer_lost``, a SIGTERM drains them for
#: ``--drain-timeout`` and then cancels them ``shutdown``. Redis faults end nothing.
ALLOWED = {
    "embedded": {"completed"},
    "upstream": {"completed", "failed:producer_lost", "cancelled:shutdown"},
}


@pytest.mark.timeout(480)
def test_every_stream_ends_once_with_nothing_lost_or_repeated_through_chaos() -> None:
    report = run_chaos(ChaosSettings())
    text = summary(report)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "chaos-summary.txt").write_text(text + "\n")
    print(text)
    assert not report.problems, text
    for kind, outcomes in report.outcomes_by_kind.items():
        assert set(outcomes) <= ALLOWED[kind], (kind, text)
    assert report.outcomes["completed"] >= report.streams // 2, text
    assert report.faults["Redis master failover"] == 1 and report.faults["Redis restart"]
    assert report.faults["replica SIGTERM (rolling)"] == 3 and report.faults["replica SIGKILL"]
    assert report.drops > 0 and report.embedded_identical > 0, text
