"""``make bench``: every benchmark side by side with its peer, one command, one report.

Runs each script in ``benchmarks/`` in its own process (a crash or timeout in one does not
stop the others), then writes to ``benchmarks/results/``:

- ``summary.json``: per benchmark its status, seconds, result files and headline ratios
  (every numeric ``*ratio*`` / ``*speedup*`` value found in its JSON);
- ``summary.md``: the table, followed by each benchmark's own markdown report;
- ``summary.png``: the headline ratios as bars (benchmarks also write their own plots).

Modes: full (default; each script's own defaults), ``--quick`` (each with ``--quick``, < 60 s
each), ``--smoke`` (CI: only the cheap benchmarks, with tiny sizes, about a minute in all;
the peers that need a second model server or LiteLLM are skipped). Scripts added to
``benchmarks/`` later are picked up and run with ``--quick`` / no flag.

    python benchmarks/run_all.py [--quick | --smoke] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Bench:
    name: str
    peer: str
    #: Arguments in smoke mode; None: skipped in smoke mode.
    smoke: tuple[str, ...] | None = None


KNOWN = [
    Bench("embedded_vs_llamacpp", "llama-cpp-python's server (1 and 8 concurrent streams)"),
    Bench("batching", "the same model one stream at a time", ("--smoke",)),
    Bench(
        "decode_kernels", "other weight types and thread counts (why batching gains what it does)"
    ),
    Bench("relay_overhead", "direct upstream, LiteLLM proxy"),
    Bench(
        "idle_capacity",
        "targets: 10k idle, 20 KB/stream, lag p99 250 ms",
        ("--smoke",),
    ),
    Bench("resume_latency", "the same journal without resume"),
    Bench("cache_ttft", "a cache miss (the model)", ("--smoke",)),
    Bench("partial_json", "re-parsing per delta (pydantic, jiter, partial-json-parser)"),
    Bench("client_stream", "openai SDK, httpx-sse"),
    Bench("asgi_json", "uvicorn+h11, granian; msgspec, json", ("--smoke",)),
]


def discover() -> list[Bench]:
    known = {bench.name for bench in KNOWN}
    extra = [
        Bench(path.stem, "(see its report)")
        for path in sorted(HERE.glob("*.py"))
        if path.stem not in known and path.stem != "run_all" and not path.stem.startswith("_")
    ]
    present = [bench for bench in KNOWN if (HERE / f"{bench.name}.py").is_file()]
    return present + extra


def headline(data: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric value whose key says it is a ratio or speed-up."""
    found: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if "ratio" in str(key) or "speedup" in str(key):
                    found[path] = float(value)
            else:
                found.update(headline(value, path))
    elif isinstance(data, list):
        for index, value in enumerate(data[:20]):
            found.update(headline(value, f"{prefix}[{index}]"))
    return found


def run_one(bench: Bench, mode: str, timeout: float) -> dict[str, Any]:
    args: list[str]
    if mode == "smoke":
        args = list(bench.smoke or ())
    elif mode == "quick":
        args = ["--quick"]
    else:
        args = []
    started_wall = time.time()
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / f"{bench.name}.py"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE.parent,
        )
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        status = f"timeout after {timeout:.0f} s"
        output = str(exc.stdout or "")[-3000:]
    seconds = time.perf_counter() - started
    files = sorted(
        path
        for path in RESULTS.glob(f"{bench.name}*")
        if path.stat().st_mtime >= started_wall - 1 and path.suffix in (".json", ".md", ".png")
    )
    ratios: dict[str, float] = {}
    for path in files:
        if path.suffix == ".json":
            with contextlib.suppress(ValueError):
                ratios.update(headline(json.loads(path.read_text())))
    return {
        "name": bench.name,
        "peer": bench.peer,
        "args": args,
        "status": status,
        "seconds": round(seconds, 1),
        "files": [path.name for path in files],
        "ratios": ratios,
        "output_tail": output if status != "ok" else "",
    }


def markdown(mode: str, runs: list[dict[str, Any]], skipped: list[str]) -> str:
    lines = [
        f"# tokenwire benchmarks ({mode})",
        "",
        "Each benchmark runs tokenwire and its peer in the same run; ratios are "
        "tokenwire / peer unless the benchmark says otherwise.",
        "",
        "| benchmark | peer | status | seconds | headline ratios |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        ratios = ", ".join(f"{k} = {v:g}" for k, v in list(run["ratios"].items())[:6]) or "—"
        lines.append(
            f"| {run['name']} | {run['peer']} | {run['status']} | {run['seconds']} | {ratios} |"
        )
    if skipped:
        lines += ["", f"Skipped in this mode: {', '.join(skipped)}."]
    for run in runs:
        for name in run["files"]:
            if name.endswith(".md"):
                lines += ["", "---", "", (RESULTS / name).read_text().strip()]
        if run["output_tail"]:
            lines += ["", f"### {run['name']} output (tail)", "", "```", run["output_tail"], "```"]
    lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    bars = [(f"{r['name']}: {k}", v) for r in runs for k, v in r["ratios"].items()]
    if not bars:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = bars[:30]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(bars) + 1.2))
    ax.barh([label[:70] for label, _ in bars], [value for _, value in bars], color="#4a7fb5")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio (log scale; 1 = parity)")
    ax.set_title("tokenwire benchmarks: headline ratios")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="each benchmark's --quick mode")
    group.add_argument("--smoke", action="store_true", help="CI: cheap benchmarks, tiny sizes")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    timeout = {"smoke": 90.0, "quick": 240.0, "full": 1800.0}[mode]
    RESULTS.mkdir(parents=True, exist_ok=True)
    benches = discover()
    if args.only:
        benches = [bench for bench in benches if bench.name in args.only]
    skipped = [b.name for b in benches if mode == "smoke" and b.smoke is None]
    runs = []
    for bench in benches:
        if bench.name in skipped:
            continue
        print(f"[run_all] {bench.name} ({mode}) ...", flush=True)
        run = run_one(bench, mode, timeout)
        print(f"[run_all] {bench.name}: {run['status']} in {run['seconds']} s", flush=True)
        runs.append(run)
    stem = "summary" if mode == "full" else f"summary_{mode}"
    summary = {"mode": mode, "python": sys.version.split()[0], "runs": runs, "skipped": skipped}
    summary["plot"] = f"{stem}.png" if plot(runs, RESULTS / f"{stem}.png") else None
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(mode, runs, skipped))
    print(f"[run_all] wrote {RESULTS / stem}.md / .json / .png", flush=True)
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if all(run["status"] == "ok" for run in summary["runs"]) else 1)
