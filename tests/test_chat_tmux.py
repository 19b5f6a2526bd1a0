"""``tokenwire chat`` driven as a person would: in tmux, with send-keys and capture-pane.

Against the real embedded server: the answer must grow on screen across captures (streamed,
not printed at the end), Ctrl-C must stop the generation on the server and leave the chat
ready for the next prompt. One-shot mode must print plain text to a pipe.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tokenwire.client import Client

from .conftest import RunningServer
from .llama_peer import llama_cpp_server

PROMPT_MARK = "you ›"


class Tmux:
    """One tmux server of our own (``-L``), so other sessions on the machine are untouched."""

    def __init__(self, command: list[str], width: int = 110, height: int = 45) -> None:
        self.socket = f"tw-chat-{uuid.uuid4().hex[:8]}"
        shell = f"{shlex.join(command)}; echo CHAT-EXITED-$?; sleep 30"
        self._tmux("new-session", "-d", "-s", "chat", "-x", str(width), "-y", str(height), shell)

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10
        )
        return result.stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "chat", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "chat")

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s; the screen:\n{screen}")

    def close(self) -> None:
        self._tmux("kill-server")


@pytest.fixture
def chat(server: RunningServer) -> Iterator[Tmux]:
    command = [
        sys.executable,
        "-m",
        "tokenwire.cli.main",
        "chat",
        "--base-url",
        server.url,
        "--max-tokens",
        "600",
        "--temperature",
        "0",
    ]
    tmux = Tmux(command)
    try:
        yield tmux
    finally:
        tmux.close()


def answer_region(screen: str, prompt: str) -> str:
    """What the chat printed after the last time ``prompt`` was typed."""
    return screen.rsplit(prompt, 1)[-1] if prompt in screen else ""


@pytest.mark.timeout(240)
def test_streams_progressively_and_survives_ctrl_c(chat: Tmux) -> None:
    chat.wait_for(lambda s: PROMPT_MARK in s, timeout=30)
    question = "Write a long story about a dragon named Ember who learns to sing."
    chat.send(question, "Enter")

    # Streaming: the answer grows across captures, before the stats line appears.
    sizes: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(sizes) < 3:
        region = answer_region(chat.screen(), question)
        assert "tok/s" not in region, "the answer ended before it was seen streaming"
        size = len(region.replace("…", "").strip())
        if size and (not sizes or size > sizes[-1]):
            sizes.append(size)
        time.sleep(0.15)
    assert len(sizes) >= 3, f"the answer did not grow progressively: {sizes}"

    # Ctrl-C stops the generation on the server; the chat stays and prompts again.
    chat.send("C-c")
    screen = chat.wait_for(lambda s: "stopped on the server" in s, timeout=30)
    region = answer_region(screen, question)
    assert region.rstrip().endswith(PROMPT_MARK)
    assert "CHAT-EXITED" not in screen
    time.sleep(1.0)
    assert answer_region(chat.screen(), question) == region, "text kept coming after Stop"

    # Slash commands work, and the chat takes another prompt and streams its answer.
    chat.send("/system You are terse.", "Enter")
    chat.wait_for(lambda s: "system prompt set" in s, timeout=10)
    chat.send("/model", "Enter")
    chat.wait_for(lambda s: "available: default" in s, timeout=10)
    chat.send("/clear", "Enter")
    chat.wait_for(lambda s: "conversation cleared" in s, timeout=10)
    second = "Now tell me about the moon."
    chat.send(second, "Enter")
    chat.wait_for(lambda s: len(answer_region(s, second).replace("…", "").strip()) > 10, 120)
    # Ctrl-C again (or, if the answer already ended, at the prompt): the chat stays.
    chat.send("C-c")
    screen = chat.wait_for(
        lambda s: answer_region(s, second).rstrip().endswith(PROMPT_MARK), timeout=30
    )
    assert "CHAT-EXITED" not in screen
    chat.send("/exit", "Enter")
    chat.wait_for(lambda s: "CHAT-EXITED-0" in s, timeout=20)


@pytest.mark.timeout(120)
def test_one_shot_in_a_terminal_renders_markdown(server: RunningServer) -> None:
    prompt = "Write a markdown bullet list of three fruits."
    args = ["--max-tokens", "40", "--temperature", "0", "--seed", "5"]
    with Client(server.url) as client:
        plain = client.chat.create(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=40,
            temperature=0,
            seed=5,
        ).text
    # A bullet list ("* item", "- item") or a numbered one ("1. item"), as the model chooses.
    bullets = [line[2:].strip() for line in plain.splitlines() if line[:2] in ("* ", "- ")]
    numbered = [line.split(". ", 1)[1].strip() for line in plain.splitlines() if line[:3] == "1. "]
    assert bullets or numbered, f"the model's answer has no markdown list to render: {plain!r}"
    tmux = Tmux(
        [
            sys.executable,
            "-m",
            "tokenwire.cli.main",
            "chat",
            prompt,
            "--base-url",
            server.url,
            *args,
        ]
    )
    try:
        screen = tmux.wait_for(lambda s: "CHAT-EXITED-0" in s, timeout=90)
    finally:
        tmux.close()
    # Rendered, not raw: bullets become "•", numbers lose their dot; the markers are gone.
    if bullets:
        assert f"• {bullets[0]}" in screen
        assert f"* {bullets[0]}" not in screen and f"- {bullets[0]}" not in screen
    else:
        assert f"1 {numbered[0]}" in screen
        assert f"1. {numbered[0]}" not in screen
    assert "tok/s" in screen or "tokens" in screen  # the stats line on a terminal


@pytest.mark.timeout(120)
def test_one_shot_prints_plain_text_to_a_pipe(server: RunningServer) -> None:
    params = {"max_tokens": 40, "temperature": 0.0, "seed": 5}
    prompt = "List three colours as a markdown list."
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenwire.cli.main",
            "chat",
            prompt,
            "--base-url",
            server.url,
            "--max-tokens",
            "40",
            "--temperature",
            "0",
            "--seed",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # no terminal escapes in a pipe
    with Client(server.url) as client:
        expected = client.chat.create(messages=[{"role": "user", "content": prompt}], **params).text
    assert result.stdout == expected + "\n"


@pytest.mark.timeout(180)
def test_one_shot_with_the_embedded_model_in_process() -> None:
    """No server: ``--embedded`` starts the model inside the chat process on a free port."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenwire.cli.main",
            "chat",
            "--embedded",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "Name a colour.",
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.timeout(180)
def test_one_shot_against_a_foreign_openai_server() -> None:
    """Not tokenwire (no /healthz): the chat speaks OpenAI chat completions to it."""
    with llama_cpp_server() as url:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tokenwire.cli.main",
                "chat",
                "--base-url",
                url,
                "--max-tokens",
                "12",
                "Name a colour.",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
