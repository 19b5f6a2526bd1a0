"""Helpers every benchmark script shares (they run as scripts: ``from _common import …``)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "QUESTIONS",
    "RESULTS",
    "free_port",
    "headline",
    "host",
    "percentile",
    "process",
    "wait_healthy",
    "write_results",
]

#: Where every benchmark writes its results (``<stem>.json`` and ``<stem>.md``).
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent

#: The load average when the benchmark started (``_common`` is imported first thing).
_LOAD_AT_START = os.getloadavg()


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or platform.machine()


def _commit() -> str:
    """The tree's commit, ``+dirty`` when src/ or benchmarks/ have uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            capture_output=True, text=True, cwd=ROOT, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "benchmarks/*.py"],
            capture_output=True, text=True, cwd=ROOT, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def host() -> dict[str, Any]:
    """What every result records: CPU model (lscpu), cores, commit, and the load average
    at the start and end of the run (the machine may be shared: load says how much)."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "commit": _commit(),
        "load_at_start": [round(v, 2) for v in _LOAD_AT_START],
        "load_at_end": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def host_line(info: dict[str, Any]) -> str:
    start, end = info["load_at_start"], info["load_at_end"]
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores; commit {info['commit']}; "
        f"load average (1/5/15 min) {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f} at the start, "
        f"{end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f} at the end; {info['when']}."
    )


def write_results(stem: str, result: Any, report: str) -> None:
    """Save ``result`` as ``results/<stem>.json`` and the markdown ``report`` as
    ``results/<stem>.md``, and print the report. A dict result gets ``host`` (CPU model,
    cores, commit, load), and the report a line saying the same."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if isinstance(result, dict):
        result["host"] = info = host()
        report = report.rstrip("\n") + "\n\n" + host_line(info)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    report = report.rstrip("\n") + "\n"
    (RESULTS / f"{stem}.md").write_text(report)
    print(report, end="")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0–100; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` until the block ends; its output goes to ``log_path`` (kept, for a
    benchmark that reads what the server logged) or to a temporary file."""
    with open(log_path, "wb") if log_path else tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: The questions the summary groups figures by (run_all.py), in this order.
QUESTIONS = (
    "engine",
    "relay",
    "capacity",
    "resume",
    "structured output",
    "client library",
    "server stack",
)


def headline(
    question: str,
    what: str,
    value: float | None,
    *,
    unit: str = "×",
    better: str = "higher",
    goal: float | None = None,
) -> dict[str, Any]:
    """One figure for ``make bench``'s summary, in words.

    ``what`` says what is compared with what ("tokenwire's tokens/s ÷ llama.cpp server's,
    1 stream"); ``better`` is ``"higher"`` or ``"lower"``; ``goal`` (same unit) is met when
    ``value`` is on its better side. A benchmark lists these in its result's ``headlines``.
    """
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, not {question!r}")
    if better not in ("higher", "lower"):
        raise ValueError("better must be 'higher' or 'lower'")
    met = None
    if goal is not None and value is not None:
        met = value >= goal if better == "higher" else value <= goal
    return {
        "question": question,
        "what": what,
        "value": None if value is None else round(float(value), 4),
        "unit": unit,
        "better": better,
        "goal": goal,
        "met": met,
    }
