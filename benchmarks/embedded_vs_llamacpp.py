"""tokenwire's embedded model vs llama-cpp-python's own server, side by side in one run.

Both serve the same GGUF (the weights tokenwire serves by default) with the same threads and
context; requests alternate between them
(interleaved rounds, so machine noise hits both alike) at temperature 0. Every request opens
with a system message of its own, so neither server can answer from a cached prompt prefix:
TTFT is a cold prefill for both.
The engine's own decode rate (llama-cpp-python in-process, no HTTP) is measured in the same
run as the ceiling both servers are held against.

Reported per server: TTFT (request sent → first content byte), inter-token latency p50/p99,
client-visible tokens/s; ratios tokenwire/peer and tokenwire/engine; the spread of TTFT.
Then 8 concurrent streams per server (alternating rounds): aggregate tokens/s and the TTFT of
every stream. llama_cpp.server runs with ``--interrupt_requests False`` (its default, True,
cancels a running stream when the next request arrives), so it serves them one after another.

    python benchmarks/embedded_vs_llamacpp.py [--quick] [--rounds N] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any

import httpx

from _common import free_port, percentile, process, wait_healthy, write_results

PROMPT = [{"role": "user", "content": "Count from 1 to 300 without stopping: 1, 2, 3,"}]


def one_stream(base: str, model: str, max_tokens: int, tag: str = "") -> dict[str, Any]:
    system = {"role": "system", "content": f"Request {tag or time.perf_counter_ns()}. Be brief."}
    body = {
        "model": model,
        "messages": [system, *PROMPT],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    arrivals: list[float] = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                arrivals.append(now)
    if len(arrivals) < 2:
        raise RuntimeError(f"{base}: too few tokens ({len(arrivals)})")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "ttft_ms": (arrivals[0] - started) * 1000,
        "itl_ms": [g * 1000 for g in gaps],
        "tokens": len(arrivals),
        "tokens_per_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
    }


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


def summarize_concurrent(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [t for r in rounds for t in r["ttft_ms"]]
    return {
        "rounds": len(rounds),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_max": max(ttfts),
    }


def engine_rate(model_path: str, threads: int, ctx: int, max_tokens: int, rounds: int) -> float:
    """Tokens/s of llama-cpp-python itself: the ceiling for both servers."""
    from llama_cpp import Llama

    llama = Llama(model_path=model_path, n_ctx=ctx, n_threads=threads, verbose=False)
    template = llama.metadata.get("tokenizer.chat_template")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

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
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds (< 60 s)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=200)
    # tokenwire's default: one core for decoding, one for serving (llama.cpp spins its threads).
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (8)")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    max_tokens = 64 if args.quick else args.max_tokens
    concurrent_rounds = 1 if args.quick else 3
    concurrent_tokens = 32 if args.quick else 64

    from tokenwire.backends.llamacpp import default_model_path, serving_weights

    # The weights tokenwire serves by default (--requantize auto: the shipped Q4_1 as q8_0),
    # for the peer and the engine ceiling too: the same file for all three.
    model = str(serving_weights(default_model_path(), "auto", threads=2))
    tw_port, peer_port = free_port(), free_port()
    python = sys.executable
    tokenwire_cmd = [
        python, "-m", "tokenwire.cli.main", "serve", "--port", str(tw_port),
        "--threads", str(args.threads), "--ctx", str(args.ctx), "--log-level", "warning",
    ]  # fmt: skip
    peer_cmd = [
        python, "-m", "llama_cpp.server", "--model", model, "--port", str(peer_port),
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
        "--n_ctx", str(args.ctx), "--interrupt_requests", "False",
    ]  # fmt: skip
    servers = {
        "tokenwire": (f"http://127.0.0.1:{tw_port}", "default"),
        "llama_cpp.server": (f"http://127.0.0.1:{peer_port}", model),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    concurrent: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    with (
        process(tokenwire_cmd) as tokenwire_proc,
        process(peer_cmd) as peer_proc,
    ):
        wait_healthy(f"http://127.0.0.1:{tw_port}/healthz", tokenwire_proc, 120)
        wait_healthy(f"http://127.0.0.1:{peer_port}/v1/models", peer_proc, 120)
        for base, name in servers.values():  # warm both (first-request effects)
            one_stream(base, name, 8)
        for round_index in range(rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for server in order:
                base, name = servers[server]
                runs[server].append(one_stream(base, name, max_tokens, f"{round_index}-{server}"))
        for round_index in range(concurrent_rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for server in order:
                base, name = servers[server]
                concurrent[server].append(
                    concurrent_round(
                        base, name, args.streams, concurrent_tokens, f"c{round_index}-{server}"
                    )
                )
    engine = engine_rate(model, args.threads, args.ctx, max_tokens, max(2, rounds // 2))

    summary = {name: summarize(r) for name, r in runs.items()}
    tw, peer = summary["tokenwire"], summary["llama_cpp.server"]
    together = {name: summarize_concurrent(r) for name, r in concurrent.items()}
    tw_n, peer_n = together["tokenwire"], together["llama_cpp.server"]
    result = {
        "benchmark": "embedded_vs_llamacpp",
        "config": {
            "rounds": rounds,
            "max_tokens": max_tokens,
            "threads": args.threads,
            "streams": args.streams,
            "concurrent_rounds": concurrent_rounds,
            "concurrent_max_tokens": concurrent_tokens,
        },
        "engine_tokens_per_s": engine,
        "servers": summary,
        "concurrent": together,
        "ratios": {
            "tokens_per_s_vs_peer": tw["tokens_per_s"] / peer["tokens_per_s"],
            "tokens_per_s_vs_engine": tw["tokens_per_s"] / engine,
            "peer_tokens_per_s_vs_engine": peer["tokens_per_s"] / engine,
            "ttft_p50_vs_peer": tw["ttft_ms_p50"] / peer["ttft_ms_p50"],
            "concurrent_tokens_per_s_vs_peer": tw_n["tokens_per_s"] / peer_n["tokens_per_s"],
            "concurrent_ttft_max_vs_peer": tw_n["ttft_ms_max"] / peer_n["ttft_ms_max"],
        },
        "goals": {"tokens_per_s_vs_peer": ">= 0.97", "tokens_per_s_vs_engine": ">= 0.97"},
    }
    stem = "embedded_vs_llamacpp_quick" if args.quick else "embedded_vs_llamacpp"
    lines = [
        "# Embedded model: tokenwire vs llama-cpp-python's server",
        "",
        f"Same GGUF, {args.threads} threads, {rounds} interleaved rounds of {max_tokens} tokens, "
        f"temperature 0. Engine ceiling (llama-cpp-python in-process): {engine:.1f} tokens/s.",
        "",
        "| server | TTFT p50 ms | TTFT min–max ms | TTFT σ ms | ITL p50 ms | ITL p99 ms "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['ttft_ms_p50']:.1f} | {s['ttft_ms_min']:.1f}–{s['ttft_ms_max']:.1f} "
            f"| {s['ttft_ms_stdev']:.1f} | {s['itl_ms_p50']:.2f} | {s['itl_ms_p99']:.2f} "
            f"| {s['tokens_per_s']:.1f} |"
        )
    ratios = result["ratios"]
    lines += [
        "",
        f"- tokens/s tokenwire / peer: **{ratios['tokens_per_s_vs_peer']:.3f}** (goal ≥ 0.97)",
        f"- tokens/s tokenwire / engine: **{ratios['tokens_per_s_vs_engine']:.3f}** (goal ≥ 0.97)",
        f"- tokens/s peer / engine: {ratios['peer_tokens_per_s_vs_engine']:.3f}",
        f"- TTFT p50 tokenwire / peer: {ratios['ttft_p50_vs_peer']:.3f}",
        "",
        f"## {args.streams} concurrent streams",
        "",
        f"{concurrent_rounds} alternating round(s), {concurrent_tokens} tokens per stream, "
        "all sent at once.",
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
        f"- aggregate tokens/s tokenwire / peer: "
        f"**{ratios['concurrent_tokens_per_s_vs_peer']:.2f}**",
        f"- TTFT max tokenwire / peer: **{ratios['concurrent_ttft_max_vs_peer']:.2f}**",
    ]
    write_results(stem, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
