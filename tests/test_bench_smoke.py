"""`make bench` in miniature: run_all.py --smoke runs the cheap benchmarks side by side with
their peers and writes the summary table (markdown, JSON) and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.timeout(240)
def test_run_all_smoke_writes_the_summary() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=230,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((RESULTS / "summary_smoke.json").read_text())
    runs = {run["name"]: run for run in summary["runs"]}
    assert {"batching", "idle_capacity", "cache_ttft", "asgi_json"} <= set(runs)
    assert all(run["status"] == "ok" for run in runs.values())
    # Heavy peers (a second model server, LiteLLM) are skipped in smoke mode, and say so.
    assert "embedded_vs_llamacpp" in summary["skipped"]
    assert runs["cache_ttft"]["ratios"]["ttft_speedup_ratio"] > 1
    assert "batched_ratio_top_vs_1" in runs["batching"]["ratios"]
    table = (RESULTS / "summary_smoke.md").read_text()
    assert "| batching |" in table and "# Continuous batching" in table
    assert (RESULTS / "summary_smoke.png").stat().st_size > 1000
