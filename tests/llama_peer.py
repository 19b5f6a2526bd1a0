"""llama-cpp-python's own OpenAI-compatible server, as a foreign peer for client-side tests.

It serves the same GGUF as tokenwire's embedded model but speaks plain OpenAI: no
``X-Stream-Id``, no resume, no cancel route, no usage chunk in streams.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tokenwire.backends.llamacpp import default_model_path

from .conftest import free_port, wait_until_healthy


@contextmanager
def llama_cpp_server() -> Iterator[str]:
    port = free_port()
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
            "1024",
            "--verbose",
            "false",
            # By default a new request cuts the running one short: a load test would then
            # measure interruptions, not streams.
            "--interrupt_requests",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/v1/models", process, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
