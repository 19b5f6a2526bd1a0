"""Continuous batching in the embedded model: 1 vs N concurrent streams, batched vs one-at-a-time.

Two embedded backends on the same GGUF, threads and context, loaded in one process:
``batched`` (``parallel=8``, the default) and ``serial`` (``parallel=1``: requests take turns,
as before continuous batching). Rounds alternate between them, so machine noise hits both
alike. Each round starts k streams at once (k = 1, 2, 4, 8; different prompts, seeded
sampling) and measures aggregate completion tokens/s, TTFT per stream and the wall time.
It also checks that each seeded stream's text equals its solo text.

Reported: aggregate tokens/s per k and backend, the ratio k-streams / 1-stream (goal for
k = 8: >= 2.5x), TTFT p50/max, and batched / serial at k = 8.

    python benchmarks/batching.py [--quick] [--smoke] [--threads N] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, write_results

PROMPTS = [
    "Tell a short story about a lighthouse.",
    "Explain how rain forms.",
    "Write a poem about autumn leaves.",
    "Describe a busy market in the morning.",
    "Give advice to a new gardener.",
    "Describe the moon to a child.",
    "Write a letter to a friend about a trip.",
    "Explain why the sky is blue.",
]


async def one(backend: Any, prompt: str, seed: int, max_tokens: int) -> dict[str, Any]:
    from tokenwire.cancel import CancelToken
    from tokenwire.requests import ChatRequest, Message, SamplingParams

    chat = ChatRequest(
        model="default",
        messages=[Message(role="user", content=prompt)],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed),
    )
    started = time.perf_counter()
    ttft = None
    text = []
    tokens = 0
    async for event in backend.stream(chat, CancelToken()):
        if event.type == "text.delta":
            if ttft is None:
                ttft = time.perf_counter() - started
            text.append(event.text)
        elif event.type == "usage":
            tokens = event.completion_tokens
    return {"ttft": ttft or 0.0, "tokens": tokens, "text": "".join(text)}


async def round_of(backend: Any, k: int, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    runs = await asyncio.gather(*(one(backend, PROMPTS[i], 100 + i, max_tokens) for i in range(k)))
    wall = time.perf_counter() - started
    return {
        "k": k,
        "wall_s": wall,
        "tokens": sum(r["tokens"] for r in runs),
        "tokens_per_s": sum(r["tokens"] for r in runs) / wall,
        "ttfts": [r["ttft"] for r in runs],
        "texts": [r["text"] for r in runs],
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tokenwire.backends.llamacpp import LlamaCppBackend

    backends = {
        name: LlamaCppBackend(
            parallel=parallel,
            n_threads=args.threads,
            n_threads_batch=args.threads_batch,
            requantize=args.requantize,
            # Rounds repeat the same prompts: every prefill stays cold, as for new prompts.
            prompt_cache=False,
        )
        for name, parallel in (("batched", 8), ("serial", 1))
    }
    for backend in backends.values():
        await backend.start()
    levels = [1, 2, 4, 8] if not args.smoke else [1, 4]
    rounds: dict[str, dict[int, list[dict[str, Any]]]] = {
        name: {k: [] for k in levels} for name in backends
    }
    solo_texts: dict[int, str] = {}
    try:
        for _ in range(args.rounds):
            for k in levels:
                for name, backend in backends.items():
                    if name == "serial" and k not in (1, max(levels)):
                        continue
                    result = await round_of(backend, k, args.max_tokens)
                    rounds[name][k].append(result)
                    if name == "batched" and k == 1:
                        solo_texts[0] = result["texts"][0]
        # Solo texts of every prompt, to compare with the batched round's texts.
        batched_top = rounds["batched"][max(levels)][-1]["texts"]
        equal = 0
        for i, text in enumerate(batched_top):
            alone = await one(backends["batched"], PROMPTS[i], 100 + i, args.max_tokens)
            equal += alone["text"] == text
    finally:
        for backend in backends.values():
            await backend.close()
    summary: dict[str, Any] = {
        "threads": args.threads,
        "threads_batch": args.threads_batch,
        "requantize": args.requantize,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "seeded_texts_equal_solo": f"{equal}/{len(batched_top)}",
        "backends": {},
    }
    for name, by_k in rounds.items():
        rows = {}
        for k, results in by_k.items():
            if not results:
                continue
            ttfts = [t for r in results for t in r["ttfts"]]
            rows[str(k)] = {
                "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in results), 2),
                "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
                "ttft_max_ms": round(max(ttfts) * 1000, 1),
            }
        summary["backends"][name] = rows
    batched = summary["backends"]["batched"]
    top = str(max(levels))
    summary["batched_ratio_top_vs_1"] = round(
        batched[top]["tokens_per_s"] / batched["1"]["tokens_per_s"], 2
    )
    summary["batched_vs_serial_ratio_top"] = round(
        batched[top]["tokens_per_s"] / summary["backends"]["serial"][top]["tokens_per_s"], 2
    )
    summary["top_k"] = int(top)
    return summary


def markdown(result: dict[str, Any]) -> str:
    top = result["top_k"]
    lines = [
        "# Continuous batching: embedded model, 1 vs N concurrent streams",
        "",
        f"{os.cpu_count()} cores, {result['threads']} decode thread(s) for one-token steps, "
        f"{result.get('threads_batch', result['threads'])} for batched steps and prefill, weights "
        f"`--requantize {result['requantize']}`, "
        f"{result['max_tokens']} tokens per stream, seeded sampling, no prompt cache, median of "
        f"{result['rounds']} interleaved rounds.",
        "",
        "| backend | streams | aggregate tokens/s | TTFT p50 | TTFT max |",
        "|---|---|---|---|---|",
    ]
    for name, rows in result["backends"].items():
        for k, row in rows.items():
            lines.append(
                f"| {name} | {k} | {row['tokens_per_s']} | {row['ttft_p50_ms']} ms "
                f"| {row['ttft_max_ms']} ms |"
            )
    lines += [
        "",
        f"- batched, {top} streams vs 1 stream: **{result['batched_ratio_top_vs_1']}x** "
        "aggregate tokens/s (goal at 8: >= 2.5x)",
        f"- batched vs serial at {top} streams: **{result['batched_vs_serial_ratio_top']}x**",
        f"- seeded texts equal to their solo runs: {result['seeded_texts_equal_solo']}",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in result["backends"].items():
        ks = [int(k) for k in rows]
        ax.plot(ks, [rows[str(k)]["tokens_per_s"] for k in ks], marker="o", label=name)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Embedded model: continuous batching")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 48 tokens (< 60 s)")
    parser.add_argument("--smoke", action="store_true", help="CI: 1 and 4 streams, 12 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="default: the server's")
    parser.add_argument("--threads-batch", type=int, default=None, help="default: the server's")
    parser.add_argument("--requantize", default="auto", help="auto (the server's), off, q4_0, q8_0")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.max_tokens = 1, min(args.max_tokens, 48)
    if args.smoke:
        args.rounds, args.max_tokens = 1, 12
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    if args.threads_batch is None:
        args.threads_batch = args.threads
    result = asyncio.run(measure(args))
    stem = "batching_smoke" if args.smoke else "batching_quick" if args.quick else "batching"
    if args.requantize != "auto":
        stem += f"_{args.requantize}"
    if args.threads_batch != args.threads:
        stem += f"_tb{args.threads_batch}"
    write_results(stem, result, markdown(result))
    plot(result, RESULTS / f"{stem}.png")
    return result


if __name__ == "__main__":
    main()
