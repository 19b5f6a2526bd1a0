"""Drive the AI SDK's own chat client (tests/node/uichat.mjs) from pytest.

The npm packages are pinned in tests/node/package-lock.json and installed by ``make test``
(``make node-deps``); a missing install fails the test with that hint rather than skipping.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
#: The majors driven end to end (ai@7 declares node >= 22 but runs on 20: see docs/ai-sdk.md).
SDKS = ("ai6", "ai7")


def run_chat(
    sdk: str, scenario: str, timeout: float = 120.0, check: bool = True, **args: Any
) -> dict[str, Any]:
    """Run one scenario of uichat.mjs with the ``sdk`` package; its JSON result. ``check``:
    fail on any chunk the SDK's schema rejects or whose fields it does not declare."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / sdk).is_dir():
        pytest.fail("Node and the AI SDK are needed: run `make node-deps` (make test does)")
    completed = subprocess.run(
        [node, "--experimental-websocket", "--no-warnings", "uichat.mjs", sdk, scenario,
         json.dumps(args)],
        cwd=NODE_DIR,
        capture_output=True,
        timeout=timeout,
        check=False,
    )  # fmt: skip
    if completed.returncode != 0 or not completed.stdout.strip():
        raise AssertionError(
            f"uichat.mjs {sdk} {scenario} exited {completed.returncode}:\n"
            f"{completed.stderr.decode(errors='replace')[-4000:]}"
        )
    result: dict[str, Any] = json.loads(completed.stdout.decode().strip().splitlines()[-1])
    assert "thrown" not in result, result["thrown"]
    if check:
        assert result["conformance"] == [], result["conformance"]
    return result


def chunks(exchange: dict[str, Any]) -> list[dict[str, Any] | str]:
    """An exchange's SSE payloads: chunks as dicts, ``[DONE]`` as the string."""
    return [
        event["data"] if event["data"] == "[DONE]" else json.loads(event["data"])
        for event in exchange["events"]
    ]


def kinds(exchange: dict[str, Any]) -> list[str]:
    return [c if isinstance(c, str) else c["type"] for c in chunks(exchange)]


def assistant_messages(chat: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in chat["messages"] if m["role"] == "assistant"]


def text_of(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")
