"""Where the gateway's time to first token goes: a timestamp at every stage.

tokenwire's gateway runs under ``_ttft_probe.py`` (the same server, with a note of
CLOCK_MONOTONIC at each stage a request's first token passes), in front of the scripted
upstream (``tests/fault_upstream.py``, model ``fast``: it sends its headers and a role chunk
at once, then the first token ``--gap`` later, stamped with the time it wrote it). The
client sends ``--requests`` requests one at a time, each on a fresh connection, alternating
with the direct path for reference.

What a relay adds to TTFT splits in two, from the client's clocks alone:
- **request path**: (relay's TTFT − its first token's one-way latency) − (the same, direct):
  the extra time until the upstream has the request;
- **first-token path**: the first token's one-way latency (upstream write → client read),
  relay minus direct.

The probe's notes then split each path by stage: the median time from the client's write
to each stage, and the median step from the stage before.

    python benchmarks/ttft_breakdown.py [--quick] [--requests N] [--gap S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _common import free_port, headline, percentile, process, wait_healthy, write_results
from _ttft_probe import STAGES
from relay_overhead import Target, one_stream, set_realtime

HERE = Path(__file__).resolve().parent
UPSTREAM = HERE.parent / "tests" / "fault_upstream.py"

CLIENT_WROTE = "client wrote the request"
REQUEST_PATH_END = "request written to the upstream"
FIRST_TOKEN_PATH_START = "upstream wrote the first token"


def request(target: Target, chunks: int, gap: float) -> dict[str, int]:
    started, stamps = asyncio.run(one_stream(target, "fast", chunks, gap))
    if len(stamps) != chunks:
        raise RuntimeError(f"got {len(stamps)} of {chunks} chunks")
    _, sent, read = stamps[0]
    return {"wrote": started, "sent": sent, "read": read}


def per_request(notes: list[tuple[int, str]], runs: list[dict[str, int]]) -> list[dict[str, int]]:
    """Each request's stages, in ``STAGES`` order: for each, its first note in the request's
    window (after the previous request's read, up to its own) that is not earlier than the
    stage found before it; with the client's and the upstream's clocks."""
    notes = sorted(notes)
    out = []
    index = 0
    previous_read = 0
    for run in runs:
        wrote, sent, read = run["wrote"], run["sent"], run["read"]
        while index < len(notes) and notes[index][0] <= previous_read:
            index += 1
        window: dict[str, list[int]] = {}
        j = index
        while j < len(notes) and notes[j][0] <= read:
            at, stage = notes[j]
            window.setdefault(stage, []).append(at)
            j += 1
        window["first token bytes arrive"] = [
            at for at in window.get("upstream bytes arrive", []) if at >= sent
        ]
        window["upstream wrote the first token"] = [sent]
        window["client read the first token"] = [read]
        stages: dict[str, int] = {CLIENT_WROTE: wrote}
        floor = 0
        for stage in STAGES:
            at = next((t for t in window.get(stage, []) if t >= floor), None)
            if at is not None:
                stages[stage] = floor = at
        out.append(stages)
        previous_read = read
    return out


def steps(requests: list[dict[str, int]]) -> list[dict[str, Any]]:
    """Per stage: the median and p90 of the step from the stage before it (in STAGES
    order, among those the request passed), in ms, over the requests."""
    order = [CLIENT_WROTE, *STAGES]
    found: dict[str, list[float]] = {stage: [] for stage in order}
    for stages in requests:
        previous: int | None = None
        for stage in order:
            at = stages.get(stage)
            if at is None:
                continue
            if previous is not None:
                found[stage].append((at - previous) / 1e6)
            previous = at
    rows = []
    for stage in order[1:]:
        values = found[stage]
        if values:
            rows.append(
                {
                    "stage": stage,
                    "step_ms_p50": round(statistics.median(values), 4),
                    "step_ms_p90": round(percentile(values, 90), 4),
                    "requests": len(values),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 30 s)")
    parser.add_argument("--smoke", action="store_true", help="CI: a few requests (~10 s)")
    parser.add_argument("--requests", type=int, default=300, help="per path")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="client, upstream and server under SCHED_FIFO (needs root): a busy shared "
        "machine's scheduling delays then do not hide the server's own",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 60
    if args.smoke:
        args.requests = 8

    up_port, tw_port = free_port(), free_port()
    notes_file = Path(tempfile.mkstemp(prefix="tw-ttft-", suffix=".json")[1])
    direct_runs: list[dict[str, int]] = []
    relay_runs: list[dict[str, int]] = []
    with ExitStack() as stack:
        upstream = stack.enter_context(
            process([sys.executable, str(UPSTREAM), "--port", str(up_port)])
        )
        wait_healthy(f"http://127.0.0.1:{up_port}/v1/models", upstream, 30)
        probe = [
            sys.executable, str(HERE / "_ttft_probe.py"), str(notes_file), "serve",
            "--port", str(tw_port), "--no-embedded", "--log-level", "warning",
            "--upstream", f"scripted=http://127.0.0.1:{up_port}/v1",
        ]  # fmt: skip
        tw = stack.enter_context(process(probe))
        wait_healthy(f"http://127.0.0.1:{tw_port}/healthz", tw, 60)
        direct, relay = Target(up_port), Target(tw_port)
        for _ in range(3 if args.smoke else 20):  # warm-up
            request(direct, args.chunks, 0.001)
            request(relay, args.chunks, 0.001)
        realtime = [os.getpid(), upstream.pid, tw.pid] if args.realtime else []
        set_realtime(realtime, True)
        try:
            for index in range(args.requests):
                pair = [(direct, direct_runs), (relay, relay_runs)]
                for target, runs in pair if index % 2 == 0 else pair[::-1]:
                    runs.append(request(target, args.chunks, args.gap))
        finally:
            set_realtime(realtime, False)
        tw.send_signal(signal.SIGINT)  # uvicorn shuts down; the probe writes its notes
        tw.wait(timeout=30)
    dumped = json.loads(notes_file.read_text())
    notes = [(int(at), str(stage)) for at, stage in dumped["notes"]]
    os.unlink(notes_file)

    def ms(runs: list[dict[str, int]], end: str, start: str) -> list[float]:
        return [(r[end] - r[start]) / 1e6 for r in runs]

    med = statistics.median
    paths = {
        name: {
            "ttft_ms_p50": med(ms(runs, "read", "wrote")),
            "ttft_ms_p90": percentile(ms(runs, "read", "wrote"), 90),
            "first_token_latency_ms_p50": med(ms(runs, "read", "sent")),
            "write_to_upstream_first_token_ms_p50": med(ms(runs, "sent", "wrote")),
        }
        for name, runs in (("direct", direct_runs), ("tokenwire", relay_runs))
    }
    d, t = paths["direct"], paths["tokenwire"]
    split = {
        "added_ttft_ms_p50": t["ttft_ms_p50"] - d["ttft_ms_p50"],
        "added_ttft_ms_p90": t["ttft_ms_p90"] - d["ttft_ms_p90"],
        "request_path_added_ms_p50": t["write_to_upstream_first_token_ms_p50"]
        - d["write_to_upstream_first_token_ms_p50"],
        "first_token_path_added_ms_p50": t["first_token_latency_ms_p50"]
        - d["first_token_latency_ms_p50"],
    }
    requests = per_request(notes, relay_runs)
    rows = steps(requests)
    result = {
        "benchmark": "ttft_breakdown",
        "config": {
            "requests_per_path": args.requests,
            "chunks": args.chunks,
            "gap_s": args.gap,
            "realtime": args.realtime,
        },
        "paths": paths,
        "split": split,
        "steps": rows,
        # Functions this tree does not have (each is looked up in both its old and new home).
        "probe_not_found": dumped["missing"],
        "headlines": [
            headline(
                "relay",
                "gateway's added time until the upstream has the request, p50 (probed)",
                split["request_path_added_ms_p50"],
                unit="ms",
                better="lower",
            ),
            headline(
                "relay",
                "gateway's added one-way latency of the first token, p50 (probed)",
                split["first_token_path_added_ms_p50"],
                unit="ms",
                better="lower",
            ),
        ],
    }
    lines = [
        "# Where the gateway's time to first token goes",
        "",
        f"{args.requests} requests per path, one at a time, each on a fresh connection, "
        f"alternating direct / tokenwire; the first token {args.gap * 1000:g} ms after the "
        "upstream's headers"
        + (", every process under SCHED_FIFO" if args.realtime else "")
        + ". tokenwire runs under `_ttft_probe.py` (a note per stage; a few µs in all).",
        "",
        "| p50 unless said | direct | tokenwire | added |",
        "|---|---|---|---|",
        f"| TTFT ms | {d['ttft_ms_p50']:.2f} | {t['ttft_ms_p50']:.2f} | "
        f"**{split['added_ttft_ms_p50']:.2f}** |",
        f"| TTFT p90 ms | {d['ttft_ms_p90']:.2f} | {t['ttft_ms_p90']:.2f} | "
        f"{split['added_ttft_ms_p90']:.2f} |",
        "| request path + the upstream's gap: client write → upstream writes the first "
        f"token, ms | {d['write_to_upstream_first_token_ms_p50']:.2f} | "
        f"{t['write_to_upstream_first_token_ms_p50']:.2f} | "
        f"{split['request_path_added_ms_p50']:.2f} |",
        "| first-token path: upstream write → client read, ms | "
        f"{d['first_token_latency_ms_p50']:.2f} | {t['first_token_latency_ms_p50']:.2f} | "
        f"{split['first_token_path_added_ms_p50']:.2f} |",
        "",
        "Each stage through tokenwire: the step from the stage before it (the previous row "
        "the request passed), over the requests.",
        "",
        "| stage (what has just happened) | step p50 ms | step p90 ms | requests |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['step_ms_p50']:.3f} | {row['step_ms_p90']:.3f} | "
            f"{row['requests']} |"
        )
    spans = {
        "request path in tokenwire (request bytes arrive → request written upstream)": (
            "request bytes arrive",
            "request written to the upstream",
        ),
        "first-token path in tokenwire (first token bytes arrive → its frame written)": (
            "first token bytes arrive",
            "first token frame written",
        ),
    }
    result["spans_ms_p50"] = {}
    for label, (first, last) in spans.items():
        values = [
            (stages[last] - stages[first]) / 1e6
            for stages in requests
            if first in stages and last in stages
        ]
        if values:
            result["spans_ms_p50"][label] = round(statistics.median(values), 4)
            lines.append(f"| **{label}** | **{statistics.median(values):.3f}** | | |")
    stem = "ttft_breakdown" + ("_smoke" if args.smoke else "_quick" if args.quick else "")
    write_results(stem, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
