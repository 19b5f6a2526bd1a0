"""`make bench` in miniature: run_all.py --smoke runs the cheap benchmarks side by side with
their peers and writes the summary (markdown, JSON) and plot: every figure in words, grouped
by question, with the machine it ran on."""

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
    assert {"batching", "idle_capacity", "cache_ttft", "asgi_json", "ttft_breakdown"} <= set(runs)
    assert all(run["status"] == "ok" for run in runs.values())
    # Heavy peers (a second model server, LiteLLM) are skipped in smoke mode, and say so.
    assert "embedded_vs_llamacpp" in summary["skipped"]
    # The machine: CPU model (lscpu), cores, commit.
    assert summary["host"]["cpu"] and summary["host"]["cores"] >= 1
    assert summary["host"]["commit"]
    # Every figure says in words what it compares and which way is better.
    figures = [figure for run in runs.values() for figure in run["headlines"]]
    for figure in figures:
        assert " " in figure["what"] and "[" not in figure["what"], figure
        assert figure["better"] in ("higher", "lower")
    cache = {f["what"]: f for f in runs["cache_ttft"]["headlines"]}
    assert cache["time to first token of a response-cache miss ÷ a hit"]["value"] > 1
    capacity = runs["idle_capacity"]["headlines"]
    assert {f["question"] for f in capacity} == {"capacity"}
    assert any("gateway stream" in f["what"] and f["goal"] == 20 for f in capacity)
    # The probe still finds the server's stages (it wraps functions by name: a refactor that
    # moves one must move the probe too, or its breakdown silently loses steps).
    breakdown = json.loads((RESULTS / "ttft_breakdown_smoke.json").read_text())
    found = {step["stage"] for step in breakdown["steps"]}
    assert {
        "handler called (routing, middleware)",
        "producer task runs",
        "first token journaled",
        "headers written",
    } <= found, found
    assert found & {"first token frame written", "frame written directly"}, found
    assert len(found) >= 15, found
    table = (RESULTS / "summary_smoke.md").read_text()
    assert "## Engine" in table and "## Capacity" in table and "## Server stack" in table
    assert "| batching | engine |" in table and "# Continuous batching" in table
    assert "AMD" in table or "Intel" in table or "Machine:" in table
    assert (RESULTS / "summary_smoke.png").stat().st_size > 1000
