"""Why batching gains what it gains here: llama.cpp decode steps by weight type and threads.

The continuous-batching goal (8 streams ≥ 2.5× the tokens/s of one) presumes a decode step
costs about the same for 1 token as for 8 (memory-bound). This measures it directly, in one
run, side by side: ``llama_decode`` time for steps of 1, 2, 4 and 8 sequences (one token each,
the engine's context settings: one KV stream per sequence, q8_0 KV cache) and for a 64-token
prefill, for

- the weights as shipped (SmolLM2-135M Q4_1, output/embedding tensor Q8_0),
- ``--requantize q4_0`` (body Q4_0: ggml's repacked GEMM kernels; output stays Q8_0),
- ``--requantize q8_0``,

each with 1 thread and with 2 threads for batched steps (``--threads-batch``), and the price
of each weight type in quality: perplexity over a fixed English text (lower is better).

    python benchmarks/decode_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from _common import write_results

TEXTS = [Path("/usr/share/common-licenses/GPL-3"), Path(__file__).resolve().parent / "README.md"]
SIZES = (1, 2, 4, 8)
PROMPT_LEN = 40
PREFILL = 64


class Engine:
    """One model in the engine's context configuration, with a reusable batch."""

    def __init__(self, path: Path, threads: int, threads_batch: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.lib = llama_cpp
        self.model = _internals.LlamaModel(
            path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = 512 * max(SIZES)
        params.n_batch = params.n_ubatch = PREFILL + 2 * max(SIZES)
        params.n_seq_max = max(SIZES)
        params.n_threads = threads
        params.n_threads_batch = threads_batch
        params.kv_unified = False
        params.no_perf = True
        params.type_k = params.type_v = 8  # q8_0, as the engine
        self.context = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.context.ctx)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> float:
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(entries)
        started = time.perf_counter()
        if self.lib.llama_decode(self.context.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    def clear(self, keep: int = 0) -> None:
        for seq in range(max(SIZES)):
            self.lib.llama_memory_seq_rm(self.memory, seq, keep, -1)

    def measure(self, steps: int) -> dict[str, float]:
        """Median step time (ms) per batch size, and a 64-token prefill."""
        prefills = []
        for _ in range(4):  # the first one also pays for warm-up (buffers, thread start)
            self.clear()
            prefills.append(
                self.decode([(100 + i, i, 0, i == PREFILL - 1) for i in range(PREFILL)])
            )
        prefill = statistics.median(prefills[1:])
        self.clear()
        for seq in range(max(SIZES)):  # every sequence holds a short prompt, as in serving
            self.decode([(100 + i, i, seq, i == PROMPT_LEN - 1) for i in range(PROMPT_LEN)])
        out = {"prefill_64_ms": prefill * 1000}
        for size in SIZES:
            times = [
                self.decode([(200 + step, PROMPT_LEN + step, seq, True) for seq in range(size)])
                for step in range(steps)
            ]
            self.clear(PROMPT_LEN)
            out[f"step_{size}_ms"] = statistics.median(times) * 1000
        return out

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.context.close()
        self.model.close()


def perplexity(path: Path, text: str, windows: int) -> float:
    """Perplexity over the second half of 512-token windows (the first half is context)."""
    import numpy
    from llama_cpp import Llama

    llama = Llama(
        model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2
    )
    tokens = llama.tokenize(text.encode())
    nll, count = 0.0, 0
    for start in range(0, min(len(tokens) - 513, 256 * windows), 256):
        window = tokens[start : start + 512]
        llama.reset()
        llama.eval(window)
        logits = numpy.array(llama.scores[:512], dtype=numpy.float64)
        for i in range(256, 511):
            row = logits[i]
            top = row.max()
            nll += top + math.log(numpy.exp(row - top).sum()) - row[window[i + 1]]
            count += 1
    llama.close()
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one text window")
    args = parser.parse_args(argv)
    steps, rounds, windows = (8, 1, 1) if args.quick else (30, 3, 8)

    from tokenwire.backends.llamacpp import default_model_path, requantized_model

    shipped = default_model_path()
    weights = {
        "as shipped (Q4_1)": shipped,
        "--requantize q4_0": requantized_model(shipped, "q4_0", threads=2),
        "--requantize q8_0": requantized_model(shipped, "q8_0", threads=2),
    }
    configs = [(name, path, tb) for name, path in weights.items() for tb in (1, 2)]
    samples: dict[str, list[dict[str, float]]] = {f"{n} | {tb}": [] for n, _, tb in configs}
    for _ in range(rounds):  # interleaved: machine noise hits every configuration alike
        for name, path, threads_batch in configs:
            engine = Engine(path, 1, threads_batch)
            try:
                samples[f"{name} | {threads_batch}"].append(engine.measure(steps))
            finally:
                engine.close()
    text_path = next(path for path in TEXTS if path.is_file())
    text = text_path.read_text()[:40_000]
    quality = {name: perplexity(path, text, windows) for name, path in weights.items()}

    rows = []
    for name, _, threads_batch in configs:
        runs = samples[f"{name} | {threads_batch}"]
        row: dict[str, Any] = {"weights": name, "threads_batch": threads_batch}
        for key in runs[0]:
            row[key] = round(statistics.median(r[key] for r in runs), 2)
        row["tokens_per_s_1"] = round(1000 / row["step_1_ms"], 1)
        row["tokens_per_s_8"] = round(8000 / row["step_8_ms"], 1)
        row["batch_gain_8"] = round(row["tokens_per_s_8"] / row["tokens_per_s_1"], 2)
        row["perplexity"] = round(quality[name], 2)
        rows.append(row)
    result = {
        "benchmark": "decode_kernels",
        "cores": os.cpu_count(),
        "steps": steps,
        "rounds": rounds,
        "text": str(text_path),
        "rows": rows,
    }
    stem = "decode_kernels_quick" if args.quick else "decode_kernels"
    lines = [
        "# llama.cpp decode steps by weight type and threads",
        "",
        f"{os.cpu_count()} cores; `llama_decode` alone (engine context: one KV stream per "
        f"sequence, q8_0 KV), median of {steps} steps × {rounds} interleaved rounds; one thread "
        "for one-token steps. Perplexity: "
        f"{text_path.name}, {windows} window(s) of 512 tokens (lower is better).",
        "",
        "| weights | threads for batched steps | 1 seq ms | 2 | 4 | 8 seqs ms "
        "| 64-token prefill ms | 8 seqs ÷ 1 seq, tokens/s | perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['weights']} | {row['threads_batch']} | {row['step_1_ms']} | "
            f"{row['step_2_ms']} | {row['step_4_ms']} | {row['step_8_ms']} | "
            f"{row['prefill_64_ms']} | **{row['batch_gain_8']}×** | {row['perplexity']} |"
        )
    write_results(stem, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
