"""``tokenwire serve``: run the server (embedded model by default)."""

from __future__ import annotations

import argparse
import logging
import sys
from types import FrameType
from typing import Any

from tokenwire.config import Settings

__all__ = ["add_parser", "exposure_warning", "run"]


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
    parser.add_argument(
        "--threads", type=int, help="one-token decode threads (default: measured at load)"
    )
    parser.add_argument(
        "--threads-batch",
        type=int,
        help="threads for batched decode and prefill (default: measured, or --threads)",
    )
    parser.add_argument("--max-queue", type=int, help="queued requests before 429")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument(
        "--upstream", action="append", help="NAME=URL of an upstream server (repeatable)"
    )
    parser.add_argument(
        "--journal",
        help="memory (default), redis://HOST:PORT/DB or redis+sentinel://HOST:PORT[,…]/MASTER/DB",
    )
    parser.add_argument(
        "--journal-outage",
        type=float,
        help="seconds streams ride out an unreachable Redis before they fail (30)",
    )
    parser.add_argument("--heartbeat", type=float, help="seconds between heartbeats (15)")
    parser.add_argument("--send-timeout", type=float, help="seconds a send may block (30)")
    parser.add_argument(
        "--disconnect-grace", type=float, help="seconds to keep generating with no reader (30)"
    )
    parser.add_argument("--stream-ttl", type=float, help="seconds finished streams stay (600)")
    parser.add_argument("--log-level", help="debug, info, warning")
    parser.add_argument("--parallel", type=int, help="streams decoded together (8)")
    parser.add_argument("--prefill-chunk", type=int, help="prompt tokens per decode step (64)")
    parser.add_argument(
        "--no-prompt-cache",
        dest="prompt_cache",
        action="store_false",
        default=None,
        help="do not reuse a finished stream's KV cache for a prompt with the same prefix",
    )
    parser.add_argument(
        "--requantize",
        help="re-quantize the embedded weights once: auto (default), off, q4_0, q8_0",
    )
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
    parser.add_argument(
        "--ui-chat-path", help="the AI SDK useChat backend's path (/api/chat; docs/ai-sdk.md)"
    )
    parser.add_argument(
        "--ui-chat-version", type=int, help="AI SDK major whose chunks it speaks: 5, 6 (default), 7"
    )
    hardening = parser.add_argument_group("keys and limits (docs/guarantees.md)")
    hardening.add_argument(
        "--api-keys", help="comma-separated API keys (env TOKENWIRE_API_KEYS); none: open"
    )
    hardening.add_argument(
        "--metrics-auth", action="store_true", default=None, help="/metrics needs a key too"
    )
    hardening.add_argument("--max-body-bytes", type=int, help="largest request body (4 MiB)")
    hardening.add_argument("--max-tokens-limit", type=int, help="clamp max_tokens to this (0: off)")
    hardening.add_argument(
        "--max-streams-per-key", type=int, help="concurrent streams per key (0: unlimited)"
    )
    hardening.add_argument("--rate-limit", type=float, help="requests/s per key (0: off)")
    hardening.add_argument("--rate-burst", type=int, help="rate limit bucket size")
    hardening.add_argument("--max-stream-bytes", type=int, help="journal bytes per stream (16 MiB)")
    hardening.add_argument(
        "--journal-max-bytes", type=int, help="memory journal bytes in total (512 MiB)"
    )
    hardening.add_argument(
        "--drain-timeout", type=float, help="seconds streams get to finish on SIGTERM (10)"
    )
    parser.set_defaults(run=run)


def exposure_warning(settings: Settings) -> str | None:
    """The banner printed when the server is open (no keys) and reachable beyond loopback."""
    if settings.api_keys or _is_loopback(settings.host):
        return None
    # Loud on purpose: anyone who can reach this address can use the model and read streams.
    banner = "!" * 78
    return (
        f"{banner}\n"
        f"tokenwire: WARNING: no API keys configured and bound to {settings.host}, not to\n"
        "  loopback: anyone who can reach this port can run the model and read, resume or\n"
        "  cancel any stream whose id they learn. Set --api-keys / TOKENWIRE_API_KEYS.\n"
        f"{banner}"
    )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenwire.server.app import create_app
    from tokenwire.server.http import HttpProtocol

    flags = {name: getattr(args, name, None) for name in Settings.names()}
    keys = flags.get("api_keys")
    if isinstance(keys, str):
        flags["api_keys"] = [k.strip() for k in keys.split(",") if k.strip()]
    settings = Settings.load(flags)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warning = exposure_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
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
    drain = app.state.server.drain

    class Server(uvicorn.Server):
        """uvicorn's own server, told when an exit signal arrives (an explicit event, no
        patching): uvicorn stops accepting, our lifespan drains streams (server/shutdown.py)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            drain.request()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # uvicorn's httptools protocol with lighter per-connection objects (server/http.py).
        http=HttpProtocol,
        log_level=settings.log_level,
        # uvicorn waits for open connections this long; the drain ends streams before it.
        timeout_graceful_shutdown=int(settings.drain_timeout) + 10,
    )
    Server(config).run()
    return 0
