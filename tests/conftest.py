"""Shared fixtures: real servers on free loopback ports, started and stopped by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_healthy(url: str, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before becoming healthy")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


@dataclass
class RunningServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@contextmanager
def tokenwire_server(
    *args: str, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[RunningServer]:
    """``tokenwire serve`` in a subprocess on a free port; yields once /healthz answers."""
    port = port or free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / f"server-{port}.log"
    full_env = {**os.environ, "TOKENWIRE_LOG_LEVEL": "warning", **(env or {})}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenwire.cli.main", "serve", "--port", str(port), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        wait_until_healthy(f"{server.url}/healthz", process, timeout=60)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One embedded-model server shared by the tests that only need the defaults.

    Disconnect grace 0: a dropped client stops decoding at once, as issue 2 expects.
    """
    with tokenwire_server("--disconnect-grace", "0", "--heartbeat", "1") as running:
        yield running


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
