"""``tokenwire bench``: a load generator for any OpenAI-compatible chat endpoint.

Two ways to apply load, each swept over several levels:
- ``--concurrency 1,2,4``: a closed loop, at most N requests in flight;
- ``--request-rate 1,2,inf``: an open loop, Poisson arrivals at R requests/s (``inf``: all at
  once), optionally capped by ``--max-concurrency``.

Metrics follow vLLM's serving benchmark (``benchmark_serving.py``), measured client side with
``tokenwire.AsyncClient``:
- TTFT: request sent → first content chunk; E2E latency: request sent → end of the stream;
- ITL: the gap between successive content chunks, pooled over all requests;
- TPOT: ``(e2e - ttft) / (output_tokens - 1)`` per request (requests with > 1 token);
- throughput: completed requests/s, output tokens/s, (input + output) tokens/s over the
  level's wall time; goodput: requests/s that met every SLO given with
  ``--goodput ttft:MS tpot:MS e2el:MS``.
Output tokens are the server's ``usage.completion_tokens`` when it reports usage (tokenwire
does), else the number of content chunks.

Results: a table on the terminal, ``--output`` JSON (one entry per level: mean, std and the
``--percentiles`` of each metric, in milliseconds) and ``--plot`` PNG of latency against load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tokenwire.client import DEFAULT_BASE_URL, AsyncClient, ProtocolName, percentile
from tokenwire.errors import TokenwireError
from tokenwire.events import StreamFailed

__all__ = ["BenchConfig", "LevelResult", "RequestResult", "add_parser", "run", "run_bench"]

DEFAULT_PROMPTS = [
    "Explain how a lighthouse works.",
    "Write a short poem about the sea.",
    "What are three uses of copper?",
    "Describe a walk through a forest in autumn.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Tell a short story about a robot who paints.",
    "List five facts about the moon.",
]

SLO_METRICS = ("ttft", "tpot", "e2el")


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "bench",
        help="load-test an OpenAI-compatible endpoint",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--base-url", default=None, help=f"server (default {DEFAULT_BASE_URL})")
    parser.add_argument("--api-key", help="API key")
    parser.add_argument("--model", default="default", help="model name (default: default)")
    parser.add_argument(
        "--protocol",
        choices=get_args(ProtocolName),
        default="openai",
        help="wire protocol (default openai: POST /v1/chat/completions)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", help="comma-separated concurrency levels to sweep (default 1,2,4)"
    )
    load.add_argument(
        "--request-rate", help="comma-separated Poisson arrival rates in requests/s ('inf' ok)"
    )
    parser.add_argument("--max-concurrency", type=int, help="cap in-flight requests (with rate)")
    parser.add_argument("--num-prompts", type=int, default=16, help="requests per level (16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="temperature (0)")
    parser.add_argument("--prompt", action="append", help="a prompt to use (repeatable)")
    parser.add_argument("--dataset", help="file of prompts: one per line, or JSONL with 'prompt'")
    parser.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000",
    )
    parser.add_argument("--percentiles", default="50,90,99", help="percentiles to report")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests first (1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for arrivals and prompt order")
    parser.add_argument("--timeout", type=float, default=300.0, help="idle timeout per request")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--plot", help="write a PNG of latency against load here")
    parser.set_defaults(run=run)


# -- configuration and results ---------------------------------------------------------------


@dataclass(slots=True)
class BenchConfig:
    base_url: str
    model: str = "default"
    protocol: ProtocolName = "openai"
    api_key: str | None = None
    mode: str = "concurrency"  # or "request_rate"
    levels: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    max_concurrency: int | None = None
    num_prompts: int = 16
    max_tokens: int = 64
    temperature: float = 0.0
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    slos_ms: dict[str, float] = field(default_factory=dict)
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    warmup: int = 1
    seed: int = 0
    timeout: float = 300.0


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def meets(self, slos_ms: dict[str, float]) -> bool:
        values = {"ttft": self.ttft, "tpot": self.tpot, "e2el": self.e2e}
        for key, limit in slos_ms.items():
            value = values[key]
            if key == "tpot" and value is None:
                continue  # one-token answers have no TPOT; vLLM counts them as meeting it
            if value is None or value * 1000.0 > limit:
                return False
        return True


@dataclass(slots=True)
class LevelResult:
    load: float
    duration: float
    requests: list[RequestResult]

    def stats(self, config: BenchConfig) -> dict[str, Any]:
        done = [r for r in self.requests if r.ok]
        out_tokens = sum(r.output_tokens for r in done)
        in_tokens = sum(r.prompt_tokens for r in done)
        duration = self.duration or math.nan
        data: dict[str, Any] = {
            "load": None if math.isinf(self.load) else self.load,
            "load_label": _label(self.load),
            "concurrency": self.load if config.mode == "concurrency" else config.max_concurrency,
            "request_rate": None
            if config.mode == "concurrency"
            else (None if math.isinf(self.load) else self.load),
            "completed": len(done),
            "failed": len(self.requests) - len(done),
            "errors": sorted({r.error for r in self.requests if r.error})[:5],
            "duration_s": self.duration,
            "total_input_tokens": in_tokens,
            "total_output_tokens": out_tokens,
            "request_throughput": len(done) / duration,
            "output_throughput": out_tokens / duration,
            "total_token_throughput": (in_tokens + out_tokens) / duration,
        }
        series = {
            "ttft_ms": [r.ttft * 1000 for r in done if r.ttft is not None],
            "tpot_ms": [t * 1000 for r in done if (t := r.tpot) is not None],
            "itl_ms": [gap * 1000 for r in done for gap in r.itl],
            "e2el_ms": [r.e2e * 1000 for r in done if r.e2e is not None],
        }
        for name, values in series.items():
            data[name] = _summary(values, config.percentiles)
        if config.slos_ms:
            good = sum(r.meets(config.slos_ms) for r in done)
            data["good_requests"] = good
            data["goodput"] = good / duration
        return data


def _label(load: float) -> str:
    if math.isinf(load):
        return "inf"
    return f"{load:g}"


def _summary(values: list[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.pstdev(values) if len(values) > 1 else (0.0 if values else None),
    }
    for q in percentiles:
        out[f"p{q:g}"] = percentile(values, q)
    return out


# -- running ---------------------------------------------------------------------------------


async def _one(
    client: AsyncClient, config: BenchConfig, prompt: str, gate: asyncio.Semaphore | None
) -> RequestResult:
    async with gate if gate is not None else _nullgate():
        stream = client.chat.stream(
            model=config.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=config.max_tokens,
            temperature=config.temperature,
        )
        try:
            async with stream:
                async for event in stream:
                    if isinstance(event, StreamFailed):
                        return RequestResult(
                            ok=False, error=str(event.error.get("message", "failed"))
                        )
            result = await stream.final()
        except TokenwireError as exc:
            return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
        metrics = result.metrics
        return RequestResult(
            ok=True,
            prompt_tokens=result.usage.prompt_tokens if result.usage else 0,
            output_tokens=metrics.output_tokens,
            ttft=metrics.ttft,
            itl=metrics.itl,
            e2e=metrics.e2e,
        )


class _nullgate:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def _level(
    client: AsyncClient,
    config: BenchConfig,
    load: float,
    prompts: list[str],
    rng: random.Random,
    progress: Progress,
) -> LevelResult:
    if config.mode == "concurrency":
        gate: asyncio.Semaphore | None = asyncio.Semaphore(int(load))
        name = f"concurrency {_label(load)}"
    else:
        gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        name = f"rate {_label(load)} req/s"
    task_id = progress.add_task(name, total=len(prompts))

    async def tracked(prompt: str) -> RequestResult:
        result = await _one(client, config, prompt, gate)
        progress.advance(task_id)
        return result

    started = time.perf_counter()
    tasks: list[asyncio.Task[RequestResult]] = []
    for index, prompt in enumerate(prompts):
        if config.mode == "request_rate" and index and not math.isinf(load):
            # Poisson process: exponential gaps between arrivals (vLLM, burstiness 1).
            await asyncio.sleep(rng.expovariate(load))
        tasks.append(asyncio.create_task(tracked(prompt)))
    results = await asyncio.gather(*tasks)
    return LevelResult(load=load, duration=time.perf_counter() - started, requests=results)


async def run_bench(config: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    """Run every level; return the JSON-able results."""
    console = console or Console(stderr=True)
    rng = random.Random(config.seed)
    biggest = max((lv for lv in config.levels if not math.isinf(lv)), default=1.0)
    connections = max(
        16, int(biggest) if config.mode == "concurrency" else config.max_concurrency or 100
    )
    levels: list[dict[str, Any]] = []
    async with AsyncClient(
        config.base_url,
        config.api_key,
        protocol=config.protocol,
        timeout=config.timeout,
        max_retries=0,  # a benchmark reports a broken stream, it does not hide it
        max_connections=connections,
    ) as client:
        for i in range(config.warmup):
            warm = await _one(client, config, config.prompts[i % len(config.prompts)], None)
            if not warm.ok:
                raise TokenwireError(f"the warm-up request failed: {warm.error}")
        with Progress(
            TextColumn("{task.description:>22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            for load in config.levels:
                prompts = [rng.choice(config.prompts) for _ in range(config.num_prompts)]
                level = await _level(client, config, load, prompts, rng, progress)
                levels.append(level.stats(config))
    return {
        "tool": "tokenwire bench",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_url": config.base_url,
        "model": config.model,
        "protocol": config.protocol,
        "mode": config.mode,
        "num_prompts": config.num_prompts,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "max_concurrency": config.max_concurrency,
        "slos_ms": config.slos_ms,
        "percentiles": config.percentiles,
        "levels": levels,
    }


# -- output ----------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def print_table(results: dict[str, Any], console: Console) -> None:
    mode = "concurrency" if results["mode"] == "concurrency" else "req/s"
    table = Table(title=f"tokenwire bench · {results['base_url']} · {results['model']}")
    for column in (
        mode,
        "ok/failed",
        "req/s",
        "out tok/s",
        "TTFT p50/p99 ms",
        "TPOT p50/p99 ms",
        "ITL p50/p99 ms",
        "E2E p50/p99 ms",
    ):
        table.add_column(column, justify="right")
    has_goodput = bool(results["slos_ms"])
    if has_goodput:
        table.add_column("goodput req/s", justify="right")
    for level in results["levels"]:
        row = [
            level["load_label"],
            f"{level['completed']}/{level['failed']}",
            f"{level['request_throughput']:.2f}",
            f"{level['output_throughput']:.1f}",
        ]
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            row.append(f"{_fmt(level[name].get('p50'))}/{_fmt(level[name].get('p99'))}")
        if has_goodput:
            row.append(f"{level['goodput']:.2f}")
        table.add_row(*row)
    console.print(table)


def plot(results: dict[str, Any], path: str | Path) -> None:
    """Latency (p50, p99) against load, and throughput, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["levels"]
    labels = [level["load_label"] for level in levels]
    xs = list(range(len(levels)))
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    panels = [
        ("ttft_ms", "TTFT (ms)"),
        ("tpot_ms", "TPOT (ms)"),
        ("e2el_ms", "End-to-end latency (ms)"),
    ]
    for ax, (name, title) in zip(axes.flat, panels, strict=False):
        styles = ["o-", "s--", "^-", "d:", "v-."]
        for index, value in enumerate(results["percentiles"]):
            q, style = f"p{value:g}", styles[index % len(styles)]
            ys = [level[name].get(q) for level in levels]
            if any(y is not None for y in ys):
                ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=q)
        ax.set_title(title)
        ax.legend()
    ax = axes.flat[3]
    ax.plot(xs, [lv["output_throughput"] for lv in levels], "o-", label="output tok/s")
    if results["slos_ms"]:
        ax2 = ax.twinx()
        ax2.plot(xs, [lv["goodput"] for lv in levels], "s--", color="tab:green", label="goodput")
        ax2.set_ylabel("goodput (req/s)")
        ax2.legend(loc="lower right")
    ax.set_title("Throughput")
    ax.legend(loc="upper left")
    xlabel = "concurrency" if results["mode"] == "concurrency" else "request rate (req/s)"
    for ax in axes.flat:
        ax.set_xticks(xs, labels)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    figure.suptitle(
        f"tokenwire bench · {results['model']} · {results['num_prompts']} requests/level · "
        f"max_tokens {results['max_tokens']}"
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- CLI -------------------------------------------------------------------------------------


def _levels(raw: str) -> list[float]:
    levels = []
    for part in raw.split(","):
        part = part.strip().lower()
        if not part:
            continue
        value = math.inf if part in ("inf", "infinity") else float(part)
        if value <= 0:
            raise ValueError(f"load levels must be > 0, not {part}")
        levels.append(value)
    if not levels:
        raise ValueError("no load levels given")
    return levels


def _slos(items: list[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for item in items or []:
        key, _, value = item.partition(":")
        key = key.strip().lower()
        if key not in SLO_METRICS or not value:
            raise ValueError(f"--goodput takes {'/'.join(SLO_METRICS)}:MS pairs, not {item!r}")
        slos[key] = float(value)
    return slos


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.dataset:
        for line in Path(args.dataset).read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                prompts.append(str(json.loads(line)["prompt"]))
            else:
                prompts.append(line)
    return prompts or list(DEFAULT_PROMPTS)


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        mode = "request_rate" if args.request_rate else "concurrency"
        levels = _levels(args.request_rate or args.concurrency or "1,2,4")
        if mode == "concurrency" and any(math.isinf(lv) or lv != int(lv) for lv in levels):
            raise ValueError("concurrency levels must be whole numbers")
        config = BenchConfig(
            base_url=args.base_url or DEFAULT_BASE_URL,
            model=args.model,
            protocol=args.protocol,
            api_key=args.api_key,
            mode=mode,
            levels=levels,
            max_concurrency=args.max_concurrency,
            num_prompts=args.num_prompts,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            prompts=_prompts(args),
            slos_ms=_slos(args.goodput),
            percentiles=[float(p) for p in args.percentiles.split(",") if p.strip()],
            warmup=args.warmup,
            seed=args.seed,
            timeout=args.timeout,
        )
        if config.num_prompts < 1:
            raise ValueError("--num-prompts must be at least 1")
    except (ValueError, OSError, KeyError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    try:
        results = asyncio.run(run_bench(config, err))
    except TokenwireError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    # Off a terminal rich would wrap the table at 80 columns; give it room instead.
    table_console = (
        Console(file=sys.stdout) if sys.stdout.isatty() else Console(stderr=True, width=150)
    )
    print_table(results, table_console)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        err.print(f"results: {args.output}", highlight=False)
    if args.plot:
        plot(results, args.plot)
        err.print(f"plot: {args.plot}", highlight=False)
    failed = sum(level["failed"] for level in results["levels"])
    return 1 if failed and not any(level["completed"] for level in results["levels"]) else 0
