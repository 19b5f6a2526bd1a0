"""Partial JSON parsing of a streamed document: tokenwire's incremental parser vs re-parsers.

A large JSON document (records with strings, numbers, nested objects) is split into 4-character
deltas, about one LLM token each. After every delta each contender produces the current partial
value, the way a structured-output stream needs it:

- ``tokenwire``: ``PartialJsonParser.feed(delta)`` then ``.value`` (each delta consumed once;
  reading the value copies only the containers still open);
- ``tokenwire-feed``: ``feed(delta)`` only, the value read once at the end (the parser's own
  cost: this is what is linear);
- ``pydantic``: ``pydantic_core.from_json(buffer, allow_partial=True)`` on the whole buffer;
- ``jiter``: ``jiter.from_json(buffer, partial_mode="trailing-strings")`` on the whole buffer;
- ``partial-json-parser``: ``partial_json_parser.loads(buffer)`` on the whole buffer.

All run in one process, one after the other per size, and must agree on the final value.
Time is the process's CPU time (all contenders are single-threaded), so other load on a shared
machine does not skew the ratios. Re-parsers are quadratic in the document size, so a
contender whose time, projected quadratically from the previous size, would exceed the budget
is skipped (reported as such). Reported per size: seconds, µs per KB
and the ratio to ``tokenwire``; per contender, the growth exponent between the smallest and
largest size it ran (1.0 = linear, 2.0 = quadratic).

    python benchmarks/partial_json.py [--quick] [--budget SECONDS] [--delta N]

Results go to ``benchmarks/results/partial_json.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections.abc import Callable
from typing import Any

from _common import write_results
from tokenwire.jsonstream import PartialJsonParser

Contender = Callable[[list[str]], Any]


def make_document(target_chars: int, seed: int = 7) -> str:
    """A deterministic JSON document of about ``target_chars`` characters."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "streaming", "token", "wire", "naïve", "日本"]
    records = []
    size = 0
    while size < target_chars:
        record = {
            "id": len(records),
            "name": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))),
            "score": round(rng.uniform(-1000, 1000), 3),
            "tags": [rng.choice(words) for _ in range(rng.randint(0, 4))],
            "active": rng.random() < 0.5,
            "parent": None if rng.random() < 0.3 else {"id": rng.randint(0, 10_000)},
            "note": 'line one\nline "two"\t\\ end',
        }
        records.append(record)
        size += len(json.dumps(record, ensure_ascii=False)) + 2
    return json.dumps({"version": 1, "records": records}, ensure_ascii=False)


def split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def run_tokenwire(deltas: list[str]) -> Any:
    parser = PartialJsonParser()
    value = None
    for delta in deltas:
        parser.feed(delta)
        value = parser.value
    parser.close()
    return value


def run_tokenwire_feed(deltas: list[str]) -> Any:
    parser = PartialJsonParser()
    for delta in deltas:
        parser.feed(delta)
    return parser.close()


def run_pydantic(deltas: list[str]) -> Any:
    from pydantic_core import from_json

    buffer = ""
    value = None
    for delta in deltas:
        buffer += delta
        value = from_json(buffer, allow_partial=True)
    return value


def run_jiter(deltas: list[str]) -> Any:
    import jiter

    buffer = b""
    value = None
    for delta in deltas:
        buffer += delta.encode()
        value = jiter.from_json(buffer, partial_mode="trailing-strings")
    return value


def run_partial_json_parser(deltas: list[str]) -> Any:
    import partial_json_parser

    buffer = ""
    value = None
    for delta in deltas:
        buffer += delta
        value = partial_json_parser.loads(buffer)
    return value


CONTENDERS: dict[str, Contender] = {
    "tokenwire": run_tokenwire,
    "tokenwire-feed": run_tokenwire_feed,
    "pydantic": run_pydantic,
    "jiter": run_jiter,
    "partial-json-parser": run_partial_json_parser,
}


def available(name: str) -> bool:
    module = {
        "pydantic": "pydantic_core",
        "jiter": "jiter",
        "partial-json-parser": "partial_json_parser",
    }.get(name)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s")
    parser.add_argument("--budget", type=float, help="seconds per run before skipping larger sizes")
    parser.add_argument("--delta", type=int, default=4, help="characters per delta (4)")
    args = parser.parse_args(argv)
    sizes = [8_000, 32_000, 128_000] if args.quick else [16_000, 64_000, 256_000, 1_000_000]
    budget = args.budget or (5.0 if args.quick else 30.0)

    runs: list[dict[str, Any]] = []
    last: dict[str, tuple[int, float]] = {}  # contender -> (size, seconds) of its last run
    skipped: set[str] = set()
    names = [n for n in CONTENDERS if available(n)]
    for size in sizes:
        text = make_document(size)
        deltas = split(text, args.delta)
        expected = json.loads(text)
        for name in names:
            previous = last.get(name)
            if previous is None and name in skipped:
                runs.append({"size": len(text), "contender": name, "skipped": "over budget"})
                continue
            if previous is not None and previous[1] * (len(text) / previous[0]) ** 2 > budget:
                skipped.add(name)
                del last[name]
                runs.append({"size": len(text), "contender": name, "skipped": "over budget"})
                continue
            started = time.process_time()
            value = CONTENDERS[name](deltas)
            seconds = time.process_time() - started
            last[name] = (len(text), seconds)
            if value != expected:
                raise SystemExit(f"{name} disagrees with json.loads at {len(text)} chars")
            runs.append(
                {
                    "size": len(text),
                    "deltas": len(deltas),
                    "contender": name,
                    "seconds": round(seconds, 4),
                    "us_per_kb": round(seconds * 1e6 / (len(text) / 1000), 1),
                }
            )
            print(f"{len(text):>9} chars  {name:<20} {seconds:8.3f} s", flush=True)

    by_size: dict[int, dict[str, float]] = {}
    for run in runs:
        if "seconds" in run:
            by_size.setdefault(run["size"], {})[run["contender"]] = run["seconds"]
    for run in runs:
        base = by_size[run["size"]].get("tokenwire")
        if "seconds" in run and base:
            run["ratio_to_tokenwire"] = round(run["seconds"] / base, 2)
    exponents: dict[str, float | None] = {}
    for name in names:
        points = [(s, t[name]) for s, t in sorted(by_size.items()) if name in t]
        if len(points) >= 2 and points[0][1] > 0:
            (s0, t0), (s1, t1) = points[0], points[-1]
            exponents[name] = round(math.log(t1 / t0) / math.log(s1 / s0), 2)
        else:
            exponents[name] = None

    result = {
        "benchmark": "partial_json",
        "quick": args.quick,
        "delta_chars": args.delta,
        "budget_seconds": budget,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "runs": runs,
        "growth_exponent": exponents,
    }
    stem = "partial_json_quick" if args.quick else "partial_json"
    lines = [
        "# Partial JSON: incremental parser vs re-parsing per delta",
        "",
        f"{args.delta}-character deltas; the partial value is produced after every delta "
        "(`tokenwire-feed`: parser only, value read at the end).",
        "",
        "| chars | contender | CPU seconds | µs/KB | × tokenwire |",
        "|---:|---|---:|---:|---:|",
    ]
    for run in runs:
        if "skipped" in run:
            lines.append(f"| {run['size']} | {run['contender']} | skipped ({run['skipped']}) | | |")
        else:
            lines.append(
                f"| {run['size']} | {run['contender']} | {run['seconds']} | {run['us_per_kb']} "
                f"| {run.get('ratio_to_tokenwire', '')} |"
            )
    lines += ["", "Growth exponent of time vs size (1 = linear, 2 = quadratic):", ""]
    lines += [f"- {name}: {exp}" for name, exp in exponents.items()]
    write_results(stem, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
