"""Helpers for the gateway tests: a tokenwire gateway over real upstreams, SSE reading."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import ARTIFACTS, RunningServer, free_port, tokenwire_server, wait_until_healthy


@dataclass
class SSE:
    event: str | None
    id: int | None
    data: str
    at: float  # monotonic arrival time

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class Read:
    status: int
    headers: httpx.Headers
    events: list[SSE] = field(default_factory=list)
    body: bytes = b""


def iter_sse(response: httpx.Response) -> Iterator[SSE]:
    """SSE messages of a streaming httpx response as they arrive (comments skipped)."""
    event: str | None = None
    seq: int | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if not line:
            if data:
                yield SSE(event, seq, "\n".join(data), time.monotonic())
            event, seq, data = None, None, []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            seq = int(line[3:].strip())


def post_stream(url: str, body: dict[str, Any], timeout: float = 60.0) -> Read:
    """POST and read the whole SSE answer (or the JSON error)."""
    with httpx.stream("POST", url, json=body, timeout=timeout) as response:
        read = Read(response.status_code, response.headers)
        if response.status_code != 200:
            read.body = response.read()
            return read
        read.events = list(iter_sse(response))
        return read


def openai_text(events: list[SSE]) -> str:
    text = []
    for sse in events:
        if sse.data == "[DONE]":
            continue
        chunk = sse.json()
        for choice in chunk.get("choices") or []:
            text.append(choice["delta"].get("content") or "")
    return "".join(text)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@dataclass
class RunningLlama:
    url: str  # the /v1 base
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def llama_server() -> Iterator[RunningLlama]:
    """llama-cpp-python's own OpenAI-compatible server on the embedded GGUF."""
    from tokenwire.backends.llamacpp import default_model_path

    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / f"llama-server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(default_model_path()),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--n_threads",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/v1/models", process, timeout=90)
        yield RunningLlama(f"http://127.0.0.1:{port}/v1", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def gateway(config: Path, *extra: str) -> Iterator[RunningServer]:
    """A gateway-only tokenwire (no embedded model) with ``config``."""
    with tokenwire_server(
        "--no-embedded",
        "--config",
        str(config),
        "--disconnect-grace",
        "0",
        "--heartbeat",
        "1",
        *extra,
    ) as running:
        yield running


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
