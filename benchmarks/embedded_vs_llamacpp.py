"""tokenwire's embedded model vs llama-cpp-python's server and llama.cpp's own C++ server.

All serve the same GGUF (the weights tokenwire serves by default) with the same context, at
temperature 0. tokenwire runs with its default threads (chosen at load by measurement);
each peer runs at every ``--threads-options`` value (1 and 2 by default) and is judged at
its best. Requests rotate between the servers (interleaved rounds, so machine noise hits all
alike). Every request opens with a system message of its own, so no server can answer from a
cached prompt prefix: TTFT is a cold prefill for all.

Peers:
- ``llama_cpp.server`` (llama-cpp-python's FastAPI server), ``--interrupt_requests False``
  (its default cancels a running stream when the next request arrives), so it serves
  concurrent streams one after another.
- ``llama-server`` (llama.cpp's C++ HTTP server, from PyPI ``xllamacpp``; an AVX2-only CPU
  build, prompt cache on, ``--streams`` parallel slots), run by ``.venv-bench``'s Python
  (``make bench-env``); skipped with a note if it is not installed.

Reported per server: TTFT (request sent → first content byte), inter-token latency p50/p99,
client-visible tokens/s; then ``--streams`` concurrent streams: aggregate tokens/s and TTFT.
And each server's overhead beyond its own timings: client-visible tokens/s against the
engine's own decode rate (tokenwire: the ``usage`` event of its native protocol; llama-server:
its ``timings``; llama_cpp.server: llama-cpp-python in-process, which reports nothing).

    python benchmarks/embedded_vs_llamacpp.py [--quick] [--rounds N] [--max-tokens N]
        [--threads-options 1,2] [--tokenwire-threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from _common import free_port, headline, percentile, process, wait_healthy, write_results

PROMPT = [{"role": "user", "content": "Count from 1 to 300 without stopping: 1, 2, 3,"}]
HERE = Path(__file__).resolve().parent
BENCH_PYTHON = HERE.parent / ".venv-bench" / "bin" / "python"


@dataclass
class Server:
    name: str  # e.g. "llama_cpp.server@2"
    kind: str  # "tokenwire", "llama_cpp.server", "llama-server"
    threads: int | None  # None: tokenwire's own choice
    command: list[str]
    health: str
    base: str
    model: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    concurrent: list[dict[str, Any]] = field(default_factory=list)
    own: list[dict[str, Any]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    chosen: str = ""  # tokenwire: the threads it measured at load (decode/batch)


def one_stream(base: str, model: str, max_tokens: int, tag: str = "") -> dict[str, Any]:
    """One OpenAI chat-completions stream: TTFT, gaps, tokens/s, and any server timings."""
    system = {"role": "system", "content": f"Request {tag or time.perf_counter_ns()}. Be brief."}
    body = {
        "model": model,
        "messages": [system, *PROMPT],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    arrivals: list[float] = []
    timings: dict[str, Any] | None = None
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                arrivals.append(now)
            if "timings" in chunk:  # llama-server's own measurements
                timings = chunk["timings"]
    return _timed(base, started, arrivals, timings)


def native_stream(base: str, max_tokens: int, tag: str) -> dict[str, Any]:
    """One stream through tokenwire's native protocol, whose ``usage`` event carries the
    engine's own TTFT and decode rate."""
    system = {"role": "system", "content": f"Request {tag}. Be brief."}
    body = {
        "model": "default",
        "messages": [system, *PROMPT],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    arrivals: list[float] = []
    usage: dict[str, Any] = {}
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/streams", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if event.get("type") == "text.delta" and event.get("text"):
                arrivals.append(now)
            elif event.get("type") == "usage":
                usage = event
    timings = {
        "prompt_ms": usage.get("ttft_ms"),
        "predicted_per_second": usage.get("tokens_per_second"),
    }
    return _timed(base, started, arrivals, timings)


def _timed(
    base: str, started: float, arrivals: list[float], timings: dict[str, Any] | None
) -> dict[str, Any]:
    if len(arrivals) < 2:
        raise RuntimeError(f"{base}: too few tokens ({len(arrivals)})")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "ttft_ms": (arrivals[0] - started) * 1000,
        "itl_ms": [g * 1000 for g in gaps],
        "tokens": len(arrivals),
        "tokens_per_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
        "own_tokens_per_s": (timings or {}).get("predicted_per_second"),
        "own_ttft_ms": (timings or {}).get("prompt_ms"),
    }


def settle() -> None:
    """A pause between requests: the previous server's ggml threads spin for a while after
    its last step (OpenMP barriers), and must not steal the next server's first tokens."""
    time.sleep(0.3)


def concurrent_round(
    base: str, model: str, streams: int, max_tokens: int, tag: str
) -> dict[str, Any]:
    """``streams`` requests sent at once: aggregate tokens/s over the round and each TTFT."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        runs = list(
            pool.map(lambda i: one_stream(base, model, max_tokens, f"{tag}-{i}"), range(streams))
        )
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "tokens": sum(r["tokens"] for r in runs),
        "tokens_per_s": sum(r["tokens"] for r in runs) / wall,
        "ttft_ms": [r["ttft_ms"] for r in runs],
    }


def engine_rate(model_path: str, threads: int, ctx: int, max_tokens: int, rounds: int) -> float:
    """Tokens/s of llama-cpp-python in-process: llama_cpp.server's own decode rate."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llama = Llama(model_path=model_path, n_ctx=ctx, n_threads=threads, verbose=False)
    template = llama.metadata.get("tokenizer.chat_template")
    eos = llama.detokenize([llama.token_eos()], special=True).decode()
    system = {"role": "system", "content": "Request engine. Be brief."}
    prompt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token="")(
        messages=[system, *PROMPT]  # type: ignore[arg-type]
    ).prompt
    tokens = llama.tokenize(prompt.encode(), add_bos=False, special=True)
    rates = []
    for _ in range(rounds):
        first = last = 0.0
        count = 0
        llama.reset()
        for token in llama.generate(tokens, temp=0.0, top_k=40, min_p=0.05, top_p=1.0):
            now = time.perf_counter()
            if count == 0:
                first = now
            last = now
            count += 1
            if count >= max_tokens or llama._model.token_eos() == token:
                break
        rates.append((count - 1) / (last - first))
    llama.close()
    return statistics.median(rates)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [r["ttft_ms"] for r in runs]
    itls = [g for r in runs for g in r["itl_ms"]]
    own = [r["own_tokens_per_s"] for r in runs if r.get("own_tokens_per_s")]
    own_ttft = [r["own_ttft_ms"] for r in runs if r.get("own_ttft_ms")]
    return {
        "runs": len(runs),
        "tokens_per_run": statistics.median(r["tokens"] for r in runs),
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_min": min(ttfts),
        "ttft_ms_max": max(ttfts),
        "ttft_ms_stdev": statistics.pstdev(ttfts),
        "itl_ms_p50": percentile(itls, 50),
        "itl_ms_p99": percentile(itls, 99),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "own_tokens_per_s": statistics.median(own) if own else None,
        "own_ttft_ms": statistics.median(own_ttft) if own_ttft else None,
    }


def summarize_concurrent(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [t for r in rounds for t in r["ttft_ms"]]
    return {
        "rounds": len(rounds),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_max": max(ttfts),
    }


def build_servers(args: argparse.Namespace, model: str) -> tuple[list[Server], list[str]]:
    """Every server to compare, and notes on peers left out."""
    python = sys.executable
    notes: list[str] = []
    servers: list[Server] = []
    port = free_port()
    tokenwire_cmd = [
        python, "-m", "tokenwire.cli.main", "serve", "--port", str(port),
        "--ctx", str(args.ctx), "--log-level", "info",
    ]  # fmt: skip
    if args.tokenwire_threads:
        tokenwire_cmd += ["--threads", str(args.tokenwire_threads)]
    base = f"http://127.0.0.1:{port}"
    servers.append(
        Server(
            "tokenwire",
            "tokenwire",
            args.tokenwire_threads,
            tokenwire_cmd,
            f"{base}/healthz",
            base,
            "default",
        )
    )
    for threads in args.threads_options:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [
            python, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(args.ctx), "--interrupt_requests", "False",
        ]  # fmt: skip
        servers.append(
            Server(
                f"llama_cpp.server@{threads}",
                "llama_cpp.server",
                threads,
                command,
                f"{base}/v1/models",
                base,
                model,
            )
        )
    if args.no_llama_server:
        notes.append("llama-server (xllamacpp) left out: --no-llama-server.")
    elif not BENCH_PYTHON.is_file() or os.system(
        f"{BENCH_PYTHON} -c 'import xllamacpp' 2>/dev/null"
    ):
        notes.append("llama-server (xllamacpp) left out: not installed; run `make bench-env`.")
    else:
        for threads in args.threads_options:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = [
                str(BENCH_PYTHON), str(HERE / "_xllamacpp_server.py"), "--model", model,
                "--port", str(port), "--threads", str(threads), "--parallel",
                str(args.streams), "--ctx", str(args.ctx),
            ]  # fmt: skip
            servers.append(
                Server(
                    f"llama-server@{threads}",
                    "llama-server",
                    threads,
                    command,
                    f"{base}/health",
                    base,
                    model,
                )
            )
    return servers, notes


def _has_xllamacpp() -> bool:
    if not BENCH_PYTHON.is_file():
        return False
    check = [str(BENCH_PYTHON), "-c", "import xllamacpp"]
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


def best(servers: list[Server], kind: str, key: str, table: dict[str, Any]) -> str | None:
    """The name of ``kind``'s server with the highest ``table[name][key]``."""
    names = [s.name for s in servers if s.kind == kind]
    return max(names, key=lambda name: table[name][key]) if names else None


def run(args: argparse.Namespace, servers: list[Server], model: str) -> None:
    rounds = 3 if args.quick else args.rounds
    max_tokens = 64 if args.quick else args.max_tokens
    concurrent_rounds = 1 if args.quick else 3
    concurrent_tokens = 32 if args.quick else 64
    with contextlib.ExitStack() as stack:
        logs = stack.enter_context(tempfile.TemporaryDirectory())
        procs = [
            stack.enter_context(process(s.command, log_path=Path(logs) / f"{i}.log"))
            for i, s in enumerate(servers)
        ]
        for server, proc in zip(servers, procs, strict=True):
            wait_healthy(server.health, proc, 180)
        for i, server in enumerate(servers):
            if server.kind == "tokenwire":  # the threads it chose at load, and why
                found = re.search(
                    r"(\d+)/(\d+) threads.*?by threads at load: (.*)\)",
                    (Path(logs) / f"{i}.log").read_text(errors="replace"),
                )
                if found:
                    server.chosen = f"{found[1]}/{found[2]} (step seconds: {found[3]})"
        for server in servers:  # warm all (first-request effects)
            one_stream(server.base, server.model, 8)
        for index in range(rounds):
            shift = index % len(servers)
            for server in servers[shift:] + servers[:shift]:
                server.loads.append(os.getloadavg()[0])
                tag = f"{index}-{server.name}"
                # tokenwire's native-protocol request (its own timings) goes first every
                # other round, so neither of its two requests always follows another server.
                native_first = server.kind == "tokenwire" and index % 2 == 1
                if native_first:
                    server.own.append(native_stream(server.base, max_tokens, f"n{tag}"))
                settle()
                server.runs.append(one_stream(server.base, server.model, max_tokens, tag))
                if server.kind == "tokenwire" and not native_first:
                    settle()
                    server.own.append(native_stream(server.base, max_tokens, f"n{tag}"))
        for index in range(concurrent_rounds):
            shift = index % len(servers)
            for server in servers[shift:] + servers[:shift]:
                settle()
                server.concurrent.append(
                    concurrent_round(
                        server.base,
                        server.model,
                        args.streams,
                        concurrent_tokens,
                        f"c{index}-{server.name}",
                    )
                )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds (~2 min)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument(
        "--threads-options",
        type=lambda text: [int(t) for t in text.split(",")],
        default=sorted({1, os.cpu_count() or 1}),
        help="peers' thread counts to try (1,2 on 2 cores); each peer is judged at its best",
    )
    parser.add_argument(
        "--tokenwire-threads", type=int, default=None, help="override tokenwire's own choice"
    )
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (8)")
    parser.add_argument("--no-llama-server", action="store_true", help="skip xllamacpp")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    max_tokens = 64 if args.quick else args.max_tokens

    from tokenwire.backends.llamacpp import default_model_path, serving_weights

    # The weights tokenwire serves by default (--requantize auto: the shipped Q4_1 as q8_0),
    # for every peer and the engine rate too: the same file for all.
    model = str(serving_weights(default_model_path(), "auto", threads=2))
    servers, notes = build_servers(args, model)
    run(args, servers, model)
    engine = {
        t: engine_rate(model, t, args.ctx, max_tokens, max(2, rounds // 2))
        for t in args.threads_options
    }

    summary = {s.name: summarize(s.runs) for s in servers}
    together = {s.name: summarize_concurrent(s.concurrent) for s in servers}
    overhead: dict[str, Any] = {}
    for s in servers:
        if s.kind == "tokenwire":
            own = summarize(s.own)
            overhead[s.name] = {
                "client_tokens_per_s": own["tokens_per_s"],
                "own_tokens_per_s": own["own_tokens_per_s"],
                "client_ttft_ms": own["ttft_ms_p50"],
                "own_ttft_ms": own["own_ttft_ms"],
                "source": "native protocol's usage event",
            }
        elif s.kind == "llama-server":
            overhead[s.name] = {
                "client_tokens_per_s": summary[s.name]["tokens_per_s"],
                "own_tokens_per_s": summary[s.name]["own_tokens_per_s"],
                "client_ttft_ms": summary[s.name]["ttft_ms_p50"],
                "own_ttft_ms": summary[s.name]["own_ttft_ms"],
                "source": "its timings (predicted_per_second, prompt_ms)",
            }
        else:
            overhead[s.name] = {
                "client_tokens_per_s": summary[s.name]["tokens_per_s"],
                "own_tokens_per_s": engine[s.threads or 1],
                "client_ttft_ms": summary[s.name]["ttft_ms_p50"],
                "own_ttft_ms": None,
                "source": "llama-cpp-python in-process (the server reports no timings)",
            }
        entry = overhead[s.name]
        if entry["own_tokens_per_s"]:
            entry["client_vs_own_tokens_per_s"] = (
                entry["client_tokens_per_s"] / entry["own_tokens_per_s"]
            )

    tw, tw_n = summary["tokenwire"], together["tokenwire"]
    ratios: dict[str, float] = {}
    headlines: list[dict[str, Any]] = []
    best_of: dict[str, dict[str, str | None]] = {}
    for kind, label in (("llama_cpp.server", "llama_cpp_server"), ("llama-server", "llama_server")):
        one = best(servers, kind, "tokens_per_s", summary)
        many = best(servers, kind, "tokens_per_s", together)
        best_of[kind] = {"one_stream": one, "concurrent": many}
        if one is None or many is None:
            continue
        ratios[f"tokens_per_s_vs_{label}"] = tw["tokens_per_s"] / summary[one]["tokens_per_s"]
        ratios[f"ttft_p50_vs_{label}"] = tw["ttft_ms_p50"] / summary[one]["ttft_ms_p50"]
        ratios[f"concurrent_tokens_per_s_vs_{label}"] = (
            tw_n["tokens_per_s"] / together[many]["tokens_per_s"]
        )
        ratios[f"concurrent_ttft_p50_vs_{label}"] = (
            tw_n["ttft_ms_p50"] / together[many]["ttft_ms_p50"]
        )
        headlines += [
            headline(
                "engine",
                f"tokenwire's tokens/s ÷ {one}'s (its best threads), 1 stream",
                ratios[f"tokens_per_s_vs_{label}"],
                goal=1.0,
            ),
            headline(
                "engine",
                f"tokenwire's TTFT p50 ÷ {one}'s, 1 stream",
                ratios[f"ttft_p50_vs_{label}"],
                better="lower",
                goal=1.0,
            ),
            headline(
                "engine",
                f"tokenwire's aggregate tokens/s ÷ {many}'s, {args.streams} streams",
                ratios[f"concurrent_tokens_per_s_vs_{label}"],
                goal=1.0,
            ),
        ]
    result = {
        "benchmark": "embedded_vs_llamacpp",
        "config": {
            "rounds": rounds,
            "max_tokens": max_tokens,
            "threads_options": args.threads_options,
            "tokenwire_threads": args.tokenwire_threads
            or f"measured at load: {servers[0].chosen or '?'}",
            "streams": args.streams,
        },
        "engine_tokens_per_s_by_threads": engine,
        "servers": summary,
        "concurrent": together,
        "overhead": overhead,
        "load_avg_1m": {s.name: statistics.median(s.loads) for s in servers},
        "best_threads": best_of,
        "ratios": ratios,
        "headlines": headlines,
        "goals": {
            "tokens_per_s_vs_*": ">= 1.0 (higher is better)",
            "concurrent_tokens_per_s_vs_*": ">= 1.0 (higher is better)",
            "ttft_p50_vs_*": "<= 1.0 (lower is better)",
        },
        "notes": notes,
    }
    write_results(
        "embedded_vs_llamacpp_quick" if args.quick else "embedded_vs_llamacpp",
        result,
        report(result, summary, together, overhead, engine),
    )
    return result


def report(
    result: dict[str, Any],
    summary: dict[str, Any],
    together: dict[str, Any],
    overhead: dict[str, Any],
    engine: dict[int, float],
) -> str:
    config = result["config"]
    loads = result["load_avg_1m"]
    lines = [
        "# Embedded model: tokenwire vs llama-cpp-python's server and llama.cpp's server",
        "",
        f"Same GGUF, {config['rounds']} interleaved rounds of {config['max_tokens']} tokens, "
        f"temperature 0; tokenwire threads: {config['tokenwire_threads']}; peers at "
        f"{config['threads_options']} threads (name@threads). llama-cpp-python in-process: "
        + ", ".join(f"{rate:.1f} tokens/s at {t} thread(s)" for t, rate in engine.items())
        + ".",
        "",
        "## One stream at a time (higher tokens/s is better, lower TTFT is better)",
        "",
        "| server | TTFT p50 ms | TTFT min–max ms | ITL p50 ms | ITL p99 ms | tokens/s | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['ttft_ms_p50']:.1f} | {s['ttft_ms_min']:.1f}–{s['ttft_ms_max']:.1f} "
            f"| {s['itl_ms_p50']:.2f} | {s['itl_ms_p99']:.2f} | {s['tokens_per_s']:.1f} "
            f"| {loads[name]:.1f} |"
        )
    lines += [
        "",
        f"## {config['streams']} concurrent streams (aggregate tokens/s: higher is better)",
        "",
        "| server | aggregate tokens/s | TTFT p50 ms | TTFT max ms |",
        "|---|---|---|---|",
    ]
    for name, s in together.items():
        lines.append(
            f"| {name} | {s['tokens_per_s']:.1f} | {s['ttft_ms_p50']:.1f} "
            f"| {s['ttft_ms_max']:.1f} |"
        )
    lines += [
        "",
        "## Each server's overhead beyond its own timings (client / own: 1.0 is no overhead)",
        "",
        "| server | client tokens/s | own tokens/s | client / own | client TTFT ms | own TTFT ms "
        "| own figures from |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, o in overhead.items():
        own_rate = f"{o['own_tokens_per_s']:.1f}" if o["own_tokens_per_s"] else "–"
        ratio = (
            f"{o['client_vs_own_tokens_per_s']:.2f}" if "client_vs_own_tokens_per_s" in o else "–"
        )
        own_ttft = f"{o['own_ttft_ms']:.1f}" if o["own_ttft_ms"] else "–"
        lines.append(
            f"| {name} | {o['client_tokens_per_s']:.1f} | {own_rate} | {ratio} "
            f"| {o['client_ttft_ms']:.1f} | {own_ttft} | {o['source']} |"
        )
    lines += ["", "## tokenwire against each peer at its best threads", ""]
    words = {
        "tokens_per_s_vs_": "1 stream, tokens/s, tokenwire / {peer} (goal ≥ 1.0, higher is better)",
        "ttft_p50_vs_": "1 stream, TTFT p50, tokenwire / {peer} (goal ≤ 1.0, lower is better)",
        "concurrent_tokens_per_s_vs_": (
            "{n} streams, aggregate tokens/s, tokenwire / {peer} (goal ≥ 1.0, higher is better)"
        ),
        "concurrent_ttft_p50_vs_": "{n} streams, TTFT p50, tokenwire / {peer} (lower is better)",
    }
    peers = {"llama_cpp_server": "llama_cpp.server", "llama_server": "llama-server"}
    for key, value in result["ratios"].items():
        for prefix, text in words.items():
            label = key.removeprefix(prefix)
            if key.startswith(prefix) and label in peers:
                kind = peers[label]
                which = result["best_threads"][kind][
                    "concurrent" if prefix.startswith("concurrent") else "one_stream"
                ]
                peer = f"{which}"
                lines.append(f"- {text.format(peer=peer, n=config['streams'])}: **{value:.2f}**")
                break
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
