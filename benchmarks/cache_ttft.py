"""Cache-hit TTFT: a deterministic request answered by the model vs replayed from the cache.

One real ``tokenwire serve --cache deterministic`` with the embedded model. Each round sends
a new prompt twice at temperature 0: the first is a miss (the model generates), the second a
hit (the finished stream is replayed, ``X-Tokenwire-Cache: hit``). Both are timed from the
request to the first content byte of the OpenAI stream, and to the end of the stream.

    python benchmarks/cache_ttft.py [--quick] [--smoke] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from _common import free_port, write_results


def timed_stream(base: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": "default",
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    started = time.perf_counter()
    ttft = None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        status = response.headers.get("x-tokenwire-cache", "")
        for line in response.iter_lines():
            content = '"content":"' in line and '"content":""' not in line
            if ttft is None and line.startswith("data: {") and content:
                ttft = time.perf_counter() - started
    return {"cache": status, "ttft": ttft or 0.0, "total": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, 48 tokens")
    parser.add_argument("--smoke", action="store_true", help="CI: 2 rounds, 8 tokens")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.max_tokens = 5, 48
    if args.smoke:
        args.rounds, args.max_tokens = 2, 8
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenwire.cli.main",
            "serve",
            "--port",
            str(port),
            "--cache",
            "deterministic",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    misses: list[dict[str, Any]] = []
    hits: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("tokenwire did not start")
            time.sleep(0.2)
        for index in range(args.rounds):
            prompt = f"Write a few sentences about the number {index + 17}."
            misses.append(timed_stream(base, prompt, args.max_tokens))
            hits.append(timed_stream(base, prompt, args.max_tokens))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    assert all(m["cache"] == "miss" for m in misses), misses
    assert all(h["cache"] == "hit" for h in hits), hits

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 2)

    result = {
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "miss_ttft_p50_ms": ms([m["ttft"] for m in misses]),
        "hit_ttft_p50_ms": ms([h["ttft"] for h in hits]),
        "miss_total_p50_ms": ms([m["total"] for m in misses]),
        "hit_total_p50_ms": ms([h["total"] for h in hits]),
    }
    result["ttft_speedup_ratio"] = round(result["miss_ttft_p50_ms"] / result["hit_ttft_p50_ms"], 1)
    result["total_speedup_ratio"] = round(
        result["miss_total_p50_ms"] / result["hit_total_p50_ms"], 1
    )
    lines = [
        "# Response cache: TTFT of a miss (model) vs a hit (replay)",
        "",
        f"{os.cpu_count()} cores, embedded model, temperature 0, {args.max_tokens} tokens, "
        f"median of {args.rounds} rounds (OpenAI streaming, first content byte).",
        "",
        "| | TTFT p50 | whole stream p50 |",
        "|---|---|---|",
        f"| miss (model) | {result['miss_ttft_p50_ms']} ms | {result['miss_total_p50_ms']} ms |",
        f"| hit (instant replay) | {result['hit_ttft_p50_ms']} ms "
        f"| {result['hit_total_p50_ms']} ms |",
        "",
        f"TTFT {result['ttft_speedup_ratio']}x faster on a hit; whole stream "
        f"{result['total_speedup_ratio']}x.",
        "",
    ]
    stem = "cache_ttft_smoke" if args.smoke else "cache_ttft_quick" if args.quick else "cache_ttft"
    write_results(stem, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
