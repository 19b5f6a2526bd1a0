"""Translate what a server says went wrong into the ``tokenwire.errors`` tree.

Two sources: an HTTP error response before the stream started (OpenAI's
``{"error": {"message", "type", "code"}}`` or Anthropic's ``{"type": "error", "error": {…}}``),
and a ``stream.failed`` event after it started (its ``error`` dict).
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

from tokenwire.errors import (
    AuthenticationFailed,
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    StreamExpired,
    StreamNotFound,
    TokenwireError,
)

__all__ = ["error_from_event", "error_from_response"]

_BY_STATUS: dict[int, type[TokenwireError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: AuthenticationFailed,
    404: StreamNotFound,
    410: StreamExpired,
    413: PayloadTooLarge,
    502: BackendProtocolError,
    503: BackendUnavailable,
    504: BackendTimeout,
}

_BY_TYPE: dict[str, type[TokenwireError]] = {
    "invalid_request_error": InvalidRequest,
    "authentication_error": AuthenticationFailed,
    "not_found_error": StreamNotFound,
    "backend_error": BackendError,
    "backend_unavailable": BackendUnavailable,
    "backend_protocol_error": BackendProtocolError,
    "backend_timeout": BackendTimeout,
    "overloaded_error": BackendUnavailable,
    "api_error": BackendError,
}


def _error_fields(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """``(message, type, code, param)`` from an OpenAI- or Anthropic-shaped error body."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or "no error body", None, None, None)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or error)
        kind = error.get("type")
        code = error.get("code")
        param = error.get("param")
        return (
            message,
            str(kind) if kind else None,
            str(code) if code else None,
            str(param) if param else None,
        )
    if isinstance(error, str):
        return (error, None, None, None)
    return (str(data)[:500], None, None, None)


def error_from_response(
    status: int, body: bytes, headers: Any = None, *, model: str | None = None
) -> TokenwireError:
    """The typed error for an HTTP error response."""
    message, kind, code, param = _error_fields(body)
    message = f"HTTP {status}: {message}"
    exc: TokenwireError
    if status == 429:
        retry_after = 1.0
        raw = headers.get("retry-after") if headers is not None else None
        if raw:
            with contextlib.suppress(ValueError):
                retry_after = float(raw)
        exc = Overloaded(message, retry_after=retry_after, code=code)
    elif status == 404 and (code == "model_not_found" or param == "model"):
        exc = ModelNotFound(model or "?")
        exc.message = message
        exc.args = (message,)
    elif status == 400 and code == "context_length_exceeded":
        exc = ContextLengthExceeded(message, param=param)
    elif status in _BY_STATUS:
        exc = _BY_STATUS[status](message, param=param, code=code)
    elif 400 <= status < 500:
        exc = RequestError(message, param=param, code=code)
        exc.status_code = status
    else:
        exc = BackendError(message, code=code)
        exc.status_code = status
    if kind and kind != exc.error_type and status not in (429,):
        exc.error_type = kind
    return exc


def error_from_event(error: dict[str, Any]) -> TokenwireError:
    """The typed error for a ``stream.failed`` event's ``error`` dict."""
    kind = str(error.get("type") or "server_error")
    message = str(error.get("message") or "the stream failed")
    code = error.get("code")
    cls = _BY_TYPE.get(kind, BackendError)
    exc = cls(message, code=str(code) if code else None)
    exc.error_type = kind
    return exc
