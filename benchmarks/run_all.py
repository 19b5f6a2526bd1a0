"""``make bench``: every benchmark side by side with its peer, one command, one report.

Runs each script in ``benchmarks/`` in its own process (a crash or timeout in one does not
stop the others), then writes to ``benchmarks/results/``:

- ``summary.md``: per question (engine, relay, capacity, resume, structured output, client
  library, server stack) a table of its figures in words: what is compared with what, the
  value, which direction is better, the goal and whether it is met; then each benchmark's
  own report;
- ``summary.json``: the same figures, each benchmark's status, seconds and result files,
  and the machine (CPU model from ``lscpu``, cores, commit, load);
- ``summary.png``: the figures grouped by question, the goal marked on each.

A benchmark states its figures in its result's ``headlines`` (``_common.headline``); for
the scripts that do not (yet), ``LEGACY`` below reads them from their JSON.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import QUESTIONS, headline, host, host_line

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Bench:
    name: str
    question: str
    peer: str
    #: Arguments in smoke mode; None: skipped in smoke mode.
    smoke: tuple[str, ...] | None = None
    #: Arguments in quick mode.
    quick: tuple[str, ...] = ("--quick",)


KNOWN = [
    Bench(
        "embedded_vs_llamacpp",
        "engine",
        "llama.cpp's servers (llama-cpp-python's, xllamacpp's), 1 and 8 concurrent streams",
    ),
    Bench("batching", "engine", "the same model one stream at a time", ("--smoke",)),
    Bench(
        "decode_kernels",
        "engine",
        "other weight types and thread counts (why batching gains what it does)",
    ),
    Bench("cache_ttft", "engine", "a cache miss (the model)", ("--smoke",)),
    Bench("relay_overhead", "relay", "direct upstream, nginx, LiteLLM proxy, Portkey gateway"),
    Bench("ttft_breakdown", "relay", "the direct path (a timestamp per stage)", ("--smoke",)),
    Bench(
        "idle_capacity",
        "capacity",
        "targets: 10k streams, 20 KB/stream, lag p99 250 ms",
        ("--smoke", "--gateway-streams", "200"),
    ),
    Bench("resume_latency", "resume", "the same journal without resume"),
    Bench(
        "soak",
        "resume",
        "faults: replica kills, Redis failover and restarts, rolling restarts",
        quick=("--cycles", "1", "--streams", "40"),
    ),
    Bench(
        "partial_json",
        "structured output",
        "re-parsing per delta (pydantic, jiter, partial-json-parser)",
    ),
    Bench("client_stream", "client library", "openai SDK, httpx-sse"),
    Bench("asgi_json", "server stack", "uvicorn+h11, granian; msgspec, json", ("--smoke",)),
]


def discover() -> list[Bench]:
    known = {bench.name for bench in KNOWN}
    extra = [
        Bench(path.stem, "server stack", "(see its report)")
        for path in sorted(HERE.glob("*.py"))
        if path.stem not in known and path.stem != "run_all" and not path.stem.startswith("_")
    ]
    present = [bench for bench in KNOWN if (HERE / f"{bench.name}.py").is_file()]
    return present + extra


# -- figures in words, for the scripts whose results do not carry ``headlines`` -------------


def _get(data: Any, *path: str | int) -> Any:
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _batching(d: dict[str, Any]) -> list[dict[str, Any]]:
    top = d.get("top_k", 8)
    serial_ttft = _get(d, "backends", "serial", str(top), "ttft_max_ms")
    batched_ttft = _get(d, "backends", "batched", str(top), "ttft_max_ms")
    return [
        headline(
            "engine",
            f"aggregate tokens/s with {top} streams batched ÷ 1 stream",
            d.get("batched_ratio_top_vs_1"),
        ),
        headline(
            "engine",
            f"aggregate tokens/s with {top} streams batched ÷ the same {top} one at a time",
            d.get("batched_vs_serial_ratio_top"),
        ),
        headline(
            "engine",
            f"slowest first token of {top} concurrent requests, batched ÷ one at a time",
            batched_ttft / serial_ttft if batched_ttft and serial_ttft else None,
            better="lower",
        ),
    ]


def _decode(d: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [row for row in d.get("rows", []) if "auto" in str(row.get("weights"))]
    return [
        headline(
            "engine",
            f"tokens/s of one 8-token llama_decode step ÷ a 1-token step "
            f"(default weights, {row.get('threads_batch')} thread(s))",
            row.get("batch_gain_8"),
        )
        for row in rows
    ]


def _cache(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        headline(
            "engine",
            "time to first token of a response-cache miss ÷ a hit",
            d.get("ttft_speedup_ratio"),
        )
    ]


def _resume(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for journal in ("memory", "redis"):
        for q in ("p50", "p99"):
            value = _get(d, "resume_latency", journal, f"{q}_ms")
            out.append(
                headline(
                    "resume",
                    f"resume after a dropped connection until the first missed event, "
                    f"{journal} journal, {q}",
                    value,
                    unit="ms",
                    better="lower",
                )
            )
    return out


def _soak(d: dict[str, Any]) -> list[dict[str, Any]]:
    problems = d.get("problems")
    return [
        headline(
            "resume",
            f"problems in {d.get('streams', '?')} streams through replica kills, Redis "
            "failovers and restarts (gaps, repeats, second terminal events, differing replays)",
            len(problems) if isinstance(problems, list) else None,
            unit="problems",
            better="lower",
            goal=0,
        )
    ]


def _partial(d: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [r for r in d.get("runs", []) if r.get("ratio_to_tokenwire") is not None]
    out = []
    for contender in ("pydantic", "jiter", "partial-json-parser"):
        mine = [r for r in runs if r.get("contender") == contender]
        if mine:
            last = max(mine, key=lambda r: r["size"])
            out.append(
                headline(
                    "structured output",
                    f"CPU to validate a streamed {last['size'] // 1000} KB JSON document: "
                    f"re-parsing with {contender} per delta ÷ tokenwire's incremental parser",
                    last["ratio_to_tokenwire"],
                )
            )
    return out


def _client(d: dict[str, Any]) -> list[dict[str, Any]]:
    r = d.get("ratios", {})
    names = {"openai": "the openai SDK", "httpx-sse": "httpx-sse"}
    out = []
    for peer, words in names.items():
        for part, what in (("decoding", "decoding SSE"), ("end_to_end", "end to end")):
            out.append(
                headline(
                    "client library",
                    f"CPU per event, {what}: {words} ÷ tokenwire's client",
                    r.get(f"{part}_{peer}_cpu_ratio"),
                )
            )
    return out


def _asgi(d: dict[str, Any]) -> list[dict[str, Any]]:
    words = {
        "uvicorn+asyncio+h11": "uvicorn with asyncio and h11",
        "granian": "granian",
    }
    return [
        headline(
            "server stack",
            f"SSE events/s served by {label} ÷ by uvicorn with uvloop and httptools (ours)",
            _get(d, "servers", key, "ratio_vs_default"),
            better="lower",
        )
        for key, label in words.items()
    ]


#: Figures read from the JSON of scripts that do not list their own ``headlines``.
LEGACY: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "batching": _batching,
    "decode_kernels": _decode,
    "cache_ttft": _cache,
    "resume_latency": _resume,
    "soak": _soak,
    "partial_json": _partial,
    "client_stream": _client,
    "asgi_json": _asgi,
}


def headlines_of(bench: Bench, data: Any) -> list[dict[str, Any]]:
    """A result's figures: its own ``headlines``, else ``LEGACY``'s reading of it."""
    if not isinstance(data, dict):
        return []
    if isinstance(data.get("headlines"), list):
        return list(data["headlines"])
    reader = LEGACY.get(bench.name)
    if reader is None:
        return []
    return [h for h in reader(data) if h["value"] is not None]


def run_one(bench: Bench, mode: str, timeout: float) -> dict[str, Any]:
    args: list[str]
    if mode == "smoke":
        args = list(bench.smoke or ())
    elif mode == "quick":
        args = list(bench.quick)
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
    figures: list[dict[str, Any]] = []
    for path in files:
        if path.suffix == ".json":
            with contextlib.suppress(ValueError):
                for figure in headlines_of(bench, json.loads(path.read_text())):
                    figure["benchmark"] = bench.name
                    figures.append(figure)
    return {
        "name": bench.name,
        "question": bench.question,
        "peer": bench.peer,
        "args": args,
        "status": status,
        "seconds": round(seconds, 1),
        "files": [path.name for path in files],
        "headlines": figures,
        "output_tail": output if status != "ok" else "",
    }


def shown(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    number = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{number}×" if unit == "×" else f"{number} {unit}"


def verdict(figure: dict[str, Any]) -> str:
    if figure["goal"] is None:
        return ""
    goal = shown(figure["goal"], figure["unit"])
    sign = "≥" if figure["better"] == "higher" else "≤"
    return f"{sign} {goal}: " + ("**met**" if figure["met"] else "**not met**")


def markdown(mode: str, runs: list[dict[str, Any]], skipped: list[str], machine: str) -> str:
    lines = [
        f"# tokenwire benchmarks ({mode})",
        "",
        machine,
        "",
        "Each benchmark runs tokenwire and its peer in the same run. A ratio says how many "
        "times the first thing named is the second; *better* says which direction wins.",
        "",
        "| benchmark | question | compared with | status | seconds |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['name']} | {run['question']} | {run['peer']} | {run['status']} | "
            f"{run['seconds']} |"
        )
    if skipped:
        lines += ["", f"Skipped in this mode: {', '.join(skipped)}."]
    figures = [f for run in runs for f in run["headlines"]]
    for question in QUESTIONS:
        mine = [f for f in figures if f["question"] == question]
        if not mine:
            continue
        lines += [
            "",
            f"## {question.capitalize()}",
            "",
            "| what is compared | value | better | goal | benchmark |",
            "|---|---|---|---|---|",
        ]
        for f in mine:
            lines.append(
                f"| {f['what']} | {shown(f['value'], f['unit'])} | {f['better']} | "
                f"{verdict(f)} | {f['benchmark']} |"
            )
    for run in runs:
        for name in run["files"]:
            if name.endswith(".md"):
                lines += ["", "---", "", (RESULTS / name).read_text().strip()]
        if run["output_tail"]:
            lines += ["", f"### {run['name']} output (tail)", "", "```", run["output_tail"], "```"]
    lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """One row per figure, grouped under its question: on the left what is compared, the
    value and which direction is better; on the right a bar on the figure's own scale (a
    ratio on a log scale, 1 marked), the goal as a dashed red line, the bar green when the
    goal is met, red when not, grey when there is none."""
    figures = [f for run in runs for f in run["headlines"] if f["value"] is not None]
    if not figures:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    times = FuncFormatter(lambda x, _: f"{x:g}×")
    rows: list[tuple[str, dict[str, Any] | None]] = []
    for question in QUESTIONS:
        mine = [f for f in figures if f["question"] == question]
        if mine:
            rows.append((question, None))
            rows += [(question, f) for f in mine]
    fig = plt.figure(figsize=(14, 0.36 * len(rows) + 0.9))
    grid = fig.add_gridspec(len(rows), 2, width_ratios=(2.3, 1), hspace=0.9, wspace=0.02)
    for index, (question, f) in enumerate(rows):
        text = fig.add_subplot(grid[index, 0])
        text.axis("off")
        bar = fig.add_subplot(grid[index, 1])
        if f is None:
            bar.axis("off")
            text.text(0, 0.1, question.upper(), fontsize=10, fontweight="bold")
            continue
        value, goal = f["value"], f["goal"]
        arrow = "higher is better" if f["better"] == "higher" else "lower is better"
        label = f"{f['what']}:  {shown(value, f['unit'])}  ({arrow}"
        label += f"; goal {shown(goal, f['unit'])})" if goal is not None else ")"
        text.text(0, 0.2, label, fontsize=7.5)
        color = "#9a9a9a" if f["met"] is None else "#3c9a4b" if f["met"] else "#c0392b"
        ratio = f["unit"] == "×" and value > 0
        if ratio:
            bar.set_xscale("log")
            low = min(value, goal or value, 1.0) / 2
            bar.set_xlim(low, max(value, goal or 0, 1.0) * 2)
            bar.barh([0], [value - low], left=low, color=color, height=0.8)
            bar.axvline(1.0, color="black", linewidth=0.6)
            bar.xaxis.set_major_formatter(times)
            bar.xaxis.set_minor_formatter(NullFormatter())
        else:
            bar.set_xlim(min(0.0, value * 1.2), max(value, goal or 0) * 1.25 or 1)
            bar.barh([0], [value], color=color, height=0.8)
        if goal is not None:
            bar.axvline(goal, color="#c0392b", linewidth=1.4, linestyle="--")
        bar.set_yticks([])
        bar.tick_params(axis="x", which="both", labelsize=6, pad=1)
        for side in ("top", "right", "left"):
            bar.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
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
    machine = host()
    summary = {"mode": mode, "host": machine, "runs": runs, "skipped": skipped}
    title = f"tokenwire benchmarks ({mode}): {machine['cpu']}, {machine['cores']} cores, "
    title += f"commit {machine['commit']}"
    summary["plot"] = f"{stem}.png" if plot(runs, RESULTS / f"{stem}.png", title) else None
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(mode, runs, skipped, host_line(machine)))
    print(f"[run_all] wrote {RESULTS / stem}.md / .json / .png", flush=True)
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if all(run["status"] == "ok" for run in summary["runs"]) else 1)
