"""API keys, stream ownership and the request gate (keys, body size, rate) in front of routes.

Promises:
- with keys configured, every protocol's routes, every other ``/v1/*`` route (and ``/metrics``
  when ``metrics_auth``) need one of them, as ``Authorization: Bearer <key>`` or
  ``x-api-key: <key>``; a missing or wrong key is a 401 in the error shape of the protocol
  whose route was asked for (found by route matching; the default protocol's elsewhere), the
  WebSocket handshake included. ``/healthz``, ``/``, ``/static`` and ``/openapi.json`` stay
  open;
- keys are compared in constant time: both sides are hashed (SHA-256) and every configured
  digest is compared with ``hmac.compare_digest``, without an early exit;
- a stream belongs to the key that started it: ``StreamMeta.owner`` holds a hash of the key
  (never the key), and ``check_owner`` makes another key's stream indistinguishable from one
  that does not exist (404);
- a body larger than ``max_body_bytes`` is a 413, whether it announces its length or not;
- each key has a token bucket of ``rate_limit`` requests per second (``rate_burst`` deep);
  beyond it a 429 with ``Retry-After``. With no keys configured everyone shares one bucket.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwire.errors import AuthenticationFailed, Overloaded, PayloadTooLarge, TokenwireError
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import WireProtocol

__all__ = [
    "OWNER_KEY",
    "ApiKeys",
    "RateLimiter",
    "RequestGate",
    "check_owner",
    "owner_of",
    "presented_key",
]

#: The ASGI scope key the gate stores the caller's owner hash under (None: open server).
OWNER_KEY = "tokenwire.owner"

#: Paths that never need a key (the UI must load before the user types one).
_OPEN_PATHS = ("/healthz", "/openapi.json", "/favicon.ico")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def owner_of(key: str) -> str:
    """What a stream records as its owner: a hash of the key, domain-separated from the
    digests used for comparison, so neither reveals the key."""
    return hashlib.sha256(b"tokenwire-owner\0" + key.encode("utf-8", "surrogatepass")).hexdigest()[
        :32
    ]


class ApiKeys:
    def __init__(self, keys: Iterable[str] | str | None) -> None:
        if isinstance(keys, str):  # a config file may give "k1,k2"
            keys = keys.split(",")
        self._digests = [_digest(k.strip()) for k in keys or () if k.strip()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, presented: str | None) -> str | None:
        """The owner hash of ``presented``; None when no keys are configured.

        Raises ``AuthenticationFailed`` for a missing or unknown key.
        """
        if not self._digests:
            return None
        if not presented:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                code="missing_api_key",
            )
        digest = _digest(presented)
        matched = False
        for candidate in self._digests:  # no early exit: time does not depend on which key
            matched |= hmac.compare_digest(candidate, digest)
        if not matched:
            raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        return owner_of(presented)


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key from ``Authorization: Bearer …`` or ``x-api-key`` (raw ASGI headers)."""
    bearer: str | None = None
    api_key: str | None = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key


def check_owner(meta: StreamMeta, owner: str | None) -> None:
    """Another key's stream answers exactly like an unknown id (no existence oracle)."""
    from tokenwire.errors import StreamNotFound

    if meta.owner is not None and not hmac.compare_digest(meta.owner, owner or ""):
        raise StreamNotFound(f"No stream with id '{meta.id}'.")


class RateLimiter:
    """A token bucket per key: ``rate`` tokens per second, ``burst`` deep."""

    def __init__(
        self,
        rate: float,
        burst: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.rate = float(rate)
        self.burst = float(burst or max(1, math.ceil(2 * self.rate)))
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str | None, tuple[float, float]] = {}  # key -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str | None) -> None:
        """Spend one token of ``key``'s bucket or raise ``Overloaded`` with the wait."""
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            raise Overloaded(
                f"Rate limit exceeded: {self.rate:g} requests/s per key. Retry in {wait:.2f}s.",
                retry_after=max(1.0, math.ceil(wait)),
                code="rate_limited",
            )
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()  # bounded memory; a full bucket for everyone is harmless
        self._buckets[key] = (tokens - 1.0, now)


def _headers_for(exc: TokenwireError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if isinstance(exc, Overloaded):
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    if isinstance(exc, AuthenticationFailed):
        headers.append((b"www-authenticate", b"Bearer"))
    return headers


class RequestGate:
    """ASGI middleware: authenticate, rate-limit and cap the body before any route runs."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ApiKeys,
        limiter: RateLimiter,
        max_body_bytes: int,
        metrics_auth: bool = False,
        protocol_of: Callable[[Scope], WireProtocol | None],
        default: WireProtocol,
        on_reject: Callable[[TokenwireError], None] | None = None,
    ) -> None:
        """``protocol_of``: the protocol whose route a request asks for, None if none;
        its error shape answers (``default``'s where None)."""
        self.app = app
        self.protocol_of = protocol_of
        self.default = default
        self.keys = keys
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes
        self.metrics_auth = metrics_auth
        self.on_reject = on_reject

    def _guarded(self, path: str, protocol: WireProtocol | None) -> bool:
        if protocol is not None or path.startswith("/v1/") or path == "/v1":
            return True
        return path == "/metrics" and self.metrics_auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        scope[OWNER_KEY] = None
        protocol = self.protocol_of(scope)
        try:
            if self._guarded(path, protocol) and not path.startswith(_OPEN_PATHS):
                owner = self.keys.authenticate(presented_key(scope.get("headers", ())))
                scope[OWNER_KEY] = owner
                self.limiter.take(owner)
            if scope["type"] == "http":
                receive = self._capped(scope, receive)
        except TokenwireError as exc:
            if self.on_reject is not None:
                self.on_reject(exc)
            await self._reject(scope, receive, send, exc, protocol or self.default)
            return
        await self.app(scope, receive, send)

    def _capped(self, scope: Scope, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        if limit <= 0:
            return receive
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = 0
                if announced > limit:
                    raise _too_large(limit)
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the route's body read: the route maps it to a 413.
                    raise _too_large(limit)
            return message

        return capped_receive

    async def _reject(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exc: TokenwireError,
        protocol: WireProtocol,
    ) -> None:
        body = orjson.dumps(protocol.error_body(exc))
        headers = _headers_for(exc)
        if scope["type"] == "http":
            await send(
                {"type": "http.response.start", "status": exc.status_code, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})
            return
        # WebSocket: answer the handshake with a plain HTTP error when the server supports
        # it (uvicorn does), so clients see a 401 and the JSON body; else refuse with 1008.
        message = await receive()  # websocket.connect comes first
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": exc.status_code,
                    "headers": headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than {limit} bytes.", code="request_too_large"
    )
