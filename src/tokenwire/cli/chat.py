"""``tokenwire chat``: a terminal chat against tokenwire or any OpenAI-compatible server.

Interactive by default: markdown renders live as tokens arrive (rich), Ctrl-C stops the
generation on the server (``POST /v1/streams/{id}/cancel``) and returns to the prompt, a second
Ctrl-C drops the connection; Ctrl-D or ``/exit`` quits. ``/model``, ``/system``, ``/clear``.
After each answer: TTFT, tokens/s and the token count.

``tokenwire chat "prompt"`` streams one answer to stdout and exits: plain text when stdout is
not a terminal (pipes, files), live markdown when it is. ``-`` reads the prompt from stdin.

Which server: ``--base-url`` (or ``TOKENWIRE_BASE_URL``); without either, the local server
at 127.0.0.1:8000, and when none answers there, the embedded model started in this process
on a free port (``--embedded`` forces that). The protocol is tokenwire's native one when the
server is tokenwire (its ``/healthz`` says so), else OpenAI chat completions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, get_args

import httpx
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from tokenwire.client import DEFAULT_BASE_URL, ChatStream, Client, ProtocolName
from tokenwire.errors import TokenwireError
from tokenwire.events import Progress, StreamCancelled, StreamFailed, TextDelta

__all__ = ["EmbeddedServer", "add_parser", "run"]

HELP = """\
[bold]/model[/] [NAME]   show or switch the model
[bold]/system[/] [TEXT]  show or set the system prompt ([bold]/system -[/] removes it)
[bold]/clear[/]          forget the conversation (keeps the system prompt)
[bold]/exit[/]           quit (or Ctrl-D)
Ctrl-C while an answer streams stops it on the server; a second Ctrl-C drops the connection."""


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "chat",
        help="chat in the terminal",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("prompt", nargs="?", help="answer this one prompt and exit ('-': stdin)")
    parser.add_argument(
        "--base-url", help=f"server URL (TOKENWIRE_BASE_URL; default {DEFAULT_BASE_URL})"
    )
    parser.add_argument("--api-key", help="API key (TOKENWIRE_API_KEY)")
    parser.add_argument("--model", default="default", help="model name (default: default)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument(
        "--protocol",
        choices=["auto", *get_args(ProtocolName)],
        default="auto",
        help="wire protocol (auto: native for tokenwire, else openai)",
    )
    parser.add_argument("--max-tokens", type=int, help="answer length limit")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="run the embedded model in this process instead of connecting to a server",
    )
    parser.add_argument("--model-path", help="GGUF for --embedded (default: SmolLM2-135M)")
    parser.add_argument("--plain", action="store_true", help="no markdown rendering")
    parser.set_defaults(run=run)


# -- the in-process server -------------------------------------------------------------------


class EmbeddedServer:
    """tokenwire (embedded model) served by uvicorn on a thread, on a free loopback port."""

    def __init__(self, model_path: str | None = None) -> None:
        import socket

        import uvicorn

        from tokenwire.config import Settings
        from tokenwire.server.app import create_app

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        settings = Settings(port=self.port, model=model_path, log_level="warning")
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="tokenwire-embedded")
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> EmbeddedServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise TokenwireError("the embedded model did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


def _is_tokenwire(http: httpx.Client, base_url: str) -> bool | None:
    """True: tokenwire answers; False: some other server; None: nothing answers."""
    try:
        response = http.get(f"{base_url}/healthz", timeout=3.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return False
    try:
        return "active_streams" in response.json()
    except ValueError:
        return False


# -- one turn --------------------------------------------------------------------------------


@dataclass
class Session:
    client: Client
    console: Console
    model: str
    protocol: ProtocolName
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    markdown: bool = True
    #: TTFT, tokens/s … of the last answer.
    stats: str = ""
    stopped: bool = False

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history


@contextlib.contextmanager
def _ctrl_c_stops(stream: ChatStream, stopping: threading.Event) -> Iterator[None]:
    """First Ctrl-C: Stop on the server (from a helper thread, so the read loop goes on
    and shows the stream end). Second, or when there is no server-side Stop: interrupt."""

    def cancel() -> None:
        with contextlib.suppress(TokenwireError, httpx.HTTPError):
            stream.cancel()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set() or not stream.resumable:
            raise KeyboardInterrupt
        stopping.set()
        threading.Thread(target=cancel, name="tokenwire-stop", daemon=True).start()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def answer(session: Session, *, live: bool, out: Any = None) -> str | None:
    """Stream one answer to the last user message; return its text (None on error)."""
    console = session.console
    stream = session.client.chat.stream(
        model=session.model,
        messages=session.messages(),
        protocol=session.protocol,
        **session.params,
    )
    stopping = threading.Event()
    text = ""
    interrupted = False
    failed: str | None = None
    try:
        with _ctrl_c_stops(stream, stopping), stream:
            if live:
                with Live(
                    Text("…", style="dim"),
                    console=console,
                    refresh_per_second=15,
                    transient=False,
                ) as view:
                    for event in stream:
                        if isinstance(event, TextDelta):
                            text += event.text
                            view.update(Markdown(text) if session.markdown else Text(text))
                        elif isinstance(event, Progress) and not text and event.position:
                            view.update(Text(f"queued: position {event.position}", style="dim"))
                        elif isinstance(event, StreamFailed):
                            failed = str(event.error.get("message", "the stream failed"))
                    if not text:
                        view.update(Text(""))
            else:
                sink = out or sys.stdout
                for event in stream:
                    if isinstance(event, TextDelta):
                        text += event.text
                        sink.write(event.text)
                        sink.flush()
                    elif isinstance(event, StreamFailed):
                        failed = str(event.error.get("message", "the stream failed"))
                sink.write("\n")
                sink.flush()
    except KeyboardInterrupt:
        interrupted = True
        text = stream.text
    except TokenwireError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return None
    if failed is not None:
        console.print(f"[bold red]error:[/] {failed}", highlight=False)
    terminal = stream.terminal
    status = stream.metrics.summary()
    if isinstance(terminal, StreamCancelled):
        status += " · stopped" + (" on the server" if terminal.reason == "stop" else "")
    elif interrupted:
        status += " · interrupted"
    session.stats = status
    session.stopped = interrupted or isinstance(terminal, StreamCancelled)
    return text


# -- commands --------------------------------------------------------------------------------


def _command(session: Session, line: str) -> bool:
    """Run a slash command; False means quit."""
    console = session.console
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/clear":
        session.history.clear()
        console.print("[dim]conversation cleared[/]")
    elif name == "/model":
        if arg:
            session.model = arg
            console.print(f"[dim]model: {arg}[/]")
        else:
            console.print(f"[dim]model: {session.model}[/]")
            with contextlib.suppress(TokenwireError):
                names = ", ".join(session.client.models())
                console.print(f"[dim]available: {names}[/]", highlight=False)
    elif name == "/system":
        if arg == "-":
            session.system = None
            console.print("[dim]system prompt removed[/]")
        elif arg:
            session.system = arg
            console.print("[dim]system prompt set[/]")
        else:
            console.print(f"[dim]system: {session.system or '(none)'}[/]", highlight=False)
    else:
        console.print(HELP)
    return True


def _interactive(session: Session) -> int:
    console = session.console
    console.print(
        f"[bold]tokenwire chat[/] · {session.client.base_url} · model [bold]{session.model}[/]"
        " · /help for commands",
        highlight=False,
    )
    while True:
        try:
            line = console.input("[bold cyan]you ›[/] ")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /exit to quit)[/]")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line):
                return 0
            continue
        session.history.append({"role": "user", "content": line})
        text = answer(session, live=True)
        if text is None:
            session.history.pop()  # the request failed: do not keep a question with no answer
            continue
        if text:
            session.history.append({"role": "assistant", "content": text})
        console.print(f"[dim]{session.stats}[/]", highlight=False)


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    base_url = args.base_url or os.environ.get("TOKENWIRE_BASE_URL")
    embedded: EmbeddedServer | None = None
    probe = httpx.Client()
    try:
        kind = None if args.embedded else _is_tokenwire(probe, (base_url or DEFAULT_BASE_URL))
        if args.embedded or (kind is None and not base_url):
            with err.status("starting the embedded model…"):
                embedded = EmbeddedServer(args.model_path).start()
            base_url, kind = embedded.url, True
        elif kind is None:
            err.print(f"[bold red]error:[/] nothing answers at {base_url}", highlight=False)
            return 1
    finally:
        probe.close()
    protocol: ProtocolName = (
        ("native" if kind else "openai") if args.protocol == "auto" else args.protocol
    )
    params: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    client = Client(base_url, args.api_key, protocol=protocol, timeout=120.0)
    interactive_console = Console(highlight=False)
    session = Session(
        client=client,
        console=interactive_console,
        model=args.model,
        protocol=protocol,
        system=args.system,
        params=params,
        markdown=not args.plain,
    )
    try:
        if args.prompt is None:
            return _interactive(session)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        session.history.append({"role": "user", "content": prompt})
        session.console = err  # errors and stats go to stderr; the answer to stdout
        tty = sys.stdout.isatty()
        if tty:
            session.console = Console(highlight=False)
        text = answer(session, live=tty and not args.plain)
        if text is None:
            return 1
        if tty or err.is_terminal:
            err.print(f"[dim]{session.stats}[/]", highlight=False)
        return 130 if session.stopped else 0
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
