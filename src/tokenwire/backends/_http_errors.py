"""The edge where an upstream call's foreign failures become tokenwire's: httpx exceptions
and an upstream's refusal (a non-2xx answer) are translated into the ``errors.py`` tree.

A refusal the client caused (400, 413, 422) is an ``InvalidRequest``: another upstream
would refuse it too, so the gateway does not fail over; every other status, a refused or
broken connection and a timeout are ``BackendError``s, which it fails over on (before the
first token).
"""

from __future__ import annotations

import logging

import httpx
import orjson

from tokenwire.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    RequestError,
)

__all__ = ["status_error", "translate"]

log = logging.getLogger("tokenwire.backends.upstream")


async def status_error(name: str, response: httpx.Response) -> BackendError | RequestError:
    try:
        body = (await response.aread())[:2000]
    except httpx.HTTPError:
        body = b""
    detail = _error_message(body) or response.reason_phrase
    status = response.status_code
    message = f"upstream {name} answered {status}: {detail}"
    # The client's fault: another upstream would refuse it too, so no failover.
    if status in (400, 413, 422):
        return InvalidRequest(message, code="upstream_rejected")
    return BackendUnavailable(message, code=f"upstream_{status}")


def _error_message(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return body.decode("utf-8", "replace")[:500]


def translate(exc: BaseException, name: str) -> BaseException:
    """httpx errors -> the tokenwire tree (our own errors pass through)."""
    if isinstance(exc, BackendError | RequestError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        error: BaseException = BackendTimeout(
            f"upstream {name}: {type(exc).__name__}", code="upstream_timeout"
        )
    elif isinstance(exc, httpx.ConnectError):
        error = BackendUnavailable(
            f"upstream {name} is unreachable: {exc}", code="upstream_unreachable"
        )
    elif isinstance(exc, httpx.TransportError):
        error = BackendUnavailable(
            f"upstream {name} broke the connection: {type(exc).__name__} {exc}",
            code="upstream_disconnected",
        )
    elif isinstance(exc, Exception):
        log.exception("unexpected error reading upstream %s", name)
        error = BackendProtocolError(f"upstream {name}: {type(exc).__name__}: {exc}")
    else:
        return exc
    error.__cause__ = exc
    return error
