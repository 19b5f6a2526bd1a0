"""``tokenwire serve``: run the server (embedded model by default)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tokenwire.config import Settings

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "serve",
        help="run the server",
        description="Run tokenwire. Every flag also reads TOKENWIRE_<FLAG> from the environment.",
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--model", help="GGUF file for the embedded model (default: SmolLM2-135M)")
    parser.add_argument("--model-name", help="name to list the embedded model under")
    parser.add_argument("--chat-template", help="Jinja chat template (file or text)")
    parser.add_argument("--ctx", type=int, help="context size of the embedded model")
    parser.add_argument("--threads", type=int, help="decode threads (default: all cores)")
    parser.add_argument("--max-queue", type=int, help="queued requests before 429")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument(
        "--upstream", action="append", help="NAME=URL of an upstream server (repeatable)"
    )
    parser.add_argument("--journal", help="memory (default) or redis://HOST:PORT/DB")
    parser.add_argument("--heartbeat", type=float, help="seconds between heartbeats (15)")
    parser.add_argument("--send-timeout", type=float, help="seconds a send may block (30)")
    parser.add_argument(
        "--disconnect-grace", type=float, help="seconds to keep generating with no reader (30)"
    )
    parser.add_argument("--stream-ttl", type=float, help="seconds finished streams stay (600)")
    parser.add_argument("--log-level", help="debug, info, warning")
    parser.add_argument("--parallel", type=int, help="streams decoded together (8)")
    parser.add_argument("--prefill-chunk", type=int, help="prompt tokens per decode step (64)")
    parser.add_argument("--cache", help="response cache: off (default), deterministic, all")
    parser.add_argument("--cache-ttl", type=float, help="seconds a cached response lives (600)")
    parser.add_argument("--cache-size", type=int, help="cached responses kept (1000)")
    parser.add_argument("--cache-replay", help="instant (default) or paced")
    parser.add_argument("--coalesce", help="default delta coalescing: off, word, line, NNms")
    parser.add_argument(
        "--no-embedded", action="store_true", default=None, help="do not load the embedded model"
    )
    parser.add_argument(
        "--tools", action="append", help="server-side tools, module:attr (repeatable)"
    )
    parser.add_argument("--tool-timeout", type=float, help="seconds per tool call (30)")
    parser.add_argument("--max-tool-steps", type=int, help="tool rounds per request (4)")
    parser.add_argument(
        "--guard", action="append", help="NAME=REGEX guard on streamed text (repeatable)"
    )
    parser.add_argument(
        "--guard-predicate", action="append", help="module:attr predicate guard (repeatable)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenwire.server.app import create_app

    flags = {name: getattr(args, name, None) for name in Settings.names()}
    settings = Settings.load(flags)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    base = f"http://{settings.host}:{settings.port}"
    print(f"tokenwire: chat UI at {base}/", flush=True)
    print(
        "tokenwire: try\n"
        f"  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "default", "stream": true, '
        '"messages": [{"role": "user", "content": "Hello!"}]}\'',
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0
