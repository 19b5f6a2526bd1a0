"""Client-side cost of reading a token stream: tokenwire's client vs the usual Python peers.

Two measurements, contenders run one after the other in one process, repeated and
interleaved, the median kept:

1. **SSE decoding** (CPU only, no sockets): a recorded stream of OpenAI chat-completion
   chunks, the way tokenwire serves them (``id:`` + ``data:`` per token), cut into
   network-sized reads of random length, is decoded into events by
   - ``tokenwire``: ``tokenwire.client.SSEDecoder.feed(bytes)``;
   - ``openai``: the official SDK's ``openai._streaming.SSEDecoder.iter_bytes``;
   - ``httpx-sse``: httpx's incremental UTF-8 decoding, then ``httpx_sse``'s line and event
     decoders, as ``EventSource.iter_sse`` chains them.
2. **End to end over HTTP**: a local server (a subprocess on a free loopback port) streams
   the same chunks as fast as it can; each contender reads the whole stream and yields typed
   objects:
   - ``tokenwire``: ``tokenwire.Client(protocol="openai").chat.stream`` (typed events);
   - ``openai``: ``openai.OpenAI().chat.completions.create(stream=True)`` (pydantic chunks);
   - ``httpx-sse``: ``httpx_sse.connect_sse`` + ``json.loads`` per event (raw dicts).

Reported: CPU microseconds per event in the client process (``time.process_time``, so the
server's work and other load on the machine do not count) and the ratio to tokenwire; for
end to end also wall-clock events/s.

    python benchmarks/client_stream.py [--quick]

Results go to ``benchmarks/results/client_stream.{json,md}``.
"""

from __future__ import annotations

import argparse
import codecs
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from _common import free_port, write_results

WORDS = ["the", " lighthouse", " keeper", " watched", " ships", ",", " and", " naïve", " 日本", "."]


def frames(count: int, seed: int = 3) -> bytes:
    """``count`` OpenAI chunks framed as tokenwire frames them, then ``[DONE]``."""
    rng = random.Random(seed)
    out = [b": stream open\n\n"]
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "default",
        "system_fingerprint": None,
    }
    for seq in range(count):
        delta = {"role": "assistant", "content": ""} if seq == 0 else {"content": rng.choice(WORDS)}
        chunk = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
        }
        retry = b"retry: 1000\n" if seq == 0 else b""  # rides on the first message
        out.append(b"id: %d\n%sdata: %s\n\n" % (seq, retry, json.dumps(chunk).encode()))
    final = {
        **base,
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    }
    out.append(b"id: %d\ndata: %s\n\n" % (count, json.dumps(final).encode()))
    out.append(b"id: %d\ndata: [DONE]\n\n" % count)
    return b"".join(out)


def reads(data: bytes, seed: int = 5) -> list[bytes]:
    """The stream as a socket delivers it: reads of 1 byte to 4 KiB."""
    rng = random.Random(seed)
    pieces, start = [], 0
    while start < len(data):
        size = rng.choice([rng.randint(1, 64), rng.randint(64, 1500), rng.randint(1500, 4096)])
        pieces.append(data[start : start + size])
        start += size
    return pieces


# -- 1. decoding -------------------------------------------------------------------------------


def decode_tokenwire(chunks: list[bytes]) -> int:
    from tokenwire.client import SSEDecoder

    decoder = SSEDecoder()
    return sum(len(decoder.feed(chunk)) for chunk in chunks)


def decode_openai(chunks: list[bytes]) -> int:
    from openai._streaming import SSEDecoder

    # It also dispatches data-less events (a lone ``retry:``), which the spec drops: skip them.
    return sum(1 for sse in SSEDecoder().iter_bytes(iter(chunks)) if sse.data)


def decode_httpx_sse(chunks: list[bytes]) -> int:
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    text = codecs.getincrementaldecoder("utf-8")()
    lines = SSELineDecoder()
    events = SSEDecoder()
    count = 0
    for chunk in chunks:
        for line in lines.decode(text.decode(chunk)):
            sse = events.decode(line.rstrip("\n"))
            if sse is not None and sse.data:  # data-less events: see decode_openai
                count += 1
    return count


DECODERS: dict[str, Callable[[list[bytes]], int]] = {
    "tokenwire": decode_tokenwire,
    "openai": decode_openai,
    "httpx-sse": decode_httpx_sse,
}


def bench_decoding(count: int, repeats: int) -> list[dict[str, Any]]:
    chunks = reads(frames(count))
    expected = count + 2
    times: dict[str, list[float]] = {name: [] for name in DECODERS}
    for _ in range(repeats):
        for name, decode in DECODERS.items():
            started = time.process_time()
            got = decode(chunks)
            times[name].append(time.process_time() - started)
            assert got == expected, f"{name} decoded {got} events, expected {expected}"
    base = statistics.median(times["tokenwire"])
    return [
        {
            "contender": name,
            "events": expected,
            "cpu_seconds": statistics.median(values),
            "cpu_us_per_event": statistics.median(values) / expected * 1e6,
            "x_tokenwire": statistics.median(values) / base,
        }
        for name, values in times.items()
    ]


# -- 2. end to end -----------------------------------------------------------------------------


def serve(port: int, count: int) -> None:
    """The stream server (run in a subprocess): the recorded chunks, as fast as possible."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    body = frames(count)
    # One send per frame, as a token server does (not one big write).
    parts = [part + b"\n\n" for part in body.split(b"\n\n") if part]

    async def completions(request: Request) -> StreamingResponse:
        async def gen() -> Any:
            for part in parts:
                yield part

        return StreamingResponse(
            gen(), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
        )

    async def health(request: Request) -> Response:
        return Response("ok")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/healthz", health),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def read_tokenwire(url: str) -> int:
    import tokenwire

    with (
        tokenwire.Client(url, protocol="openai") as client,
        client.chat.stream(messages=MESSAGES) as stream,
    ):
        return sum(1 for _ in stream)


def read_openai(url: str) -> int:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    try:
        stream = client.chat.completions.create(
            model="default",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        return sum(1 for _ in stream)
    finally:
        client.close()


def read_httpx_sse(url: str) -> int:
    from httpx_sse import connect_sse

    count = 0
    with (
        httpx.Client() as client,
        connect_sse(
            client,
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": "default", "messages": MESSAGES, "stream": True},
        ) as source,
    ):
        for sse in source.iter_sse():
            if sse.data != "[DONE]":
                json.loads(sse.data)
            count += 1
    return count


READERS: dict[str, Callable[[str], int]] = {
    "tokenwire": read_tokenwire,
    "openai": read_openai,
    "httpx-sse": read_httpx_sse,
}


def running_server(count: int) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--events", str(count)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def bench_end_to_end(count: int, repeats: int) -> list[dict[str, Any]]:
    cpu: dict[str, list[float]] = {name: [] for name in READERS}
    wall: dict[str, list[float]] = {name: [] for name in READERS}
    events: dict[str, int] = {}
    for url in running_server(count):
        for read in READERS.values():
            read(url)  # warm-up: imports, connection setup
        for _ in range(repeats):
            for name, read in READERS.items():
                wall_start, cpu_start = time.perf_counter(), time.process_time()
                events[name] = read(url)
                cpu[name].append(time.process_time() - cpu_start)
                wall[name].append(time.perf_counter() - wall_start)
    base = statistics.median(cpu["tokenwire"])
    return [
        {
            "contender": name,
            "events": events[name],
            "cpu_seconds": statistics.median(cpu[name]),
            "cpu_us_per_event": statistics.median(cpu[name]) / count * 1e6,
            "events_per_second": count / statistics.median(wall[name]),
            "x_tokenwire": statistics.median(cpu[name]) / base,
        }
        for name in READERS
    ]


# -- report ------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Client stream cost: tokenwire client vs openai SDK vs httpx-sse",
        "",
        f"{results['events']} chunks; median of {results['repeats']} interleaved runs; CPU time "
        "of the client process only.",
        "",
        "## SSE decoding (bytes in random-sized reads → events)",
        "",
        "| contender | CPU µs/event | × tokenwire |",
        "|---|---:|---:|",
    ]
    for row in results["decoding"]:
        lines.append(
            f"| {row['contender']} | {row['cpu_us_per_event']:.2f} | {row['x_tokenwire']:.2f} |"
        )
    lines += [
        "",
        "## End to end over HTTP (typed objects out)",
        "",
        "| contender | CPU µs/event | events/s (wall) | × tokenwire (CPU) |",
        "|---|---:|---:|---:|",
    ]
    for row in results["end_to_end"]:
        lines.append(
            f"| {row['contender']} | {row['cpu_us_per_event']:.2f} | "
            f"{row['events_per_second']:,.0f} | {row['x_tokenwire']:.2f} |"
        )
    lines += ["", f"Python {results['python']} on {results['machine']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stream, fewer repeats")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=None, help="chunks per stream")
    args = parser.parse_args(argv)
    count = args.events or (5_000 if args.quick else 50_000)
    if args.serve:
        serve(args.serve, count)
        return 0
    repeats = 3 if args.quick else 5
    results: dict[str, Any] = {
        "benchmark": "client_stream",
        "quick": args.quick,
        "events": count,
        "repeats": repeats,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.system()}",
        "decoding": bench_decoding(count, repeats),
        "end_to_end": bench_end_to_end(count, repeats),
    }
    # Headline figures (run_all.py collects keys with "ratio"): peer CPU per event ÷ ours.
    results["ratios"] = {
        f"{part}_{row['contender']}_cpu_ratio": round(row["x_tokenwire"], 3)
        for part in ("decoding", "end_to_end")
        for row in results[part]
        if row["contender"] != "tokenwire"
    }
    stem = "client_stream_quick" if args.quick else "client_stream"
    write_results(stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
