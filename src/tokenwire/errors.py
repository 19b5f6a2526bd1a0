"""One exception tree for tokenwire.

Foreign exceptions (llama.cpp, httpx, redis) are translated into this tree at the edge of the
module that calls them (``raise … from exc``); ``server/`` maps the tree to HTTP statuses and
error events exactly once.

    TokenwireError
    ├── RequestError                 the caller's fault: 4xx before any output
    │   ├── InvalidRequest           400  malformed body, wrong types, bad values
    │   ├── ContextLengthExceeded    400  the prompt does not fit the model's context
    │   ├── AuthenticationFailed     401
    │   ├── StreamNotFound           404  unknown stream, or another key's stream
    │   ├── ModelNotFound            404
    │   ├── RouteNotFound            404  no route at that path
    │   ├── MethodNotAllowed         405  the path exists, the method does not
    │   ├── StreamExpired            410  the stream was evicted after its TTL
    │   ├── PayloadTooLarge          413
    │   └── Overloaded               429  queue full / rate limited (carries retry_after)
    ├── BackendError                 the model side failed
    │   ├── BackendUnavailable       503  connection refused, 5xx, timeouts
    │   ├── BackendProtocolError     502  malformed upstream output
    │   └── BackendTimeout           504  no token within the idle timeout
    ├── OutputValidationError        the output broke the requested JSON / tool schema
    │                                (mid-stream: stream.failed naming the JSON path)
    ├── StreamInterrupted            client side: the stream broke and retries were spent
    ├── StreamTooLarge               413  the stream outgrew its journal size limit
                                     (mid-stream: stream.failed; what was journaled stays)
    └── JournalError                 the journal (memory, Redis) failed
        └── StreamHandedOver         another replica produces the stream now (takeover)
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BackendError",
    "BackendProtocolError",
    "BackendTimeout",
    "BackendUnavailable",
    "ContextLengthExceeded",
    "InvalidRequest",
    "JournalError",
    "MethodNotAllowed",
    "ModelNotFound",
    "OutputValidationError",
    "Overloaded",
    "PayloadTooLarge",
    "RequestError",
    "RouteNotFound",
    "StreamExpired",
    "StreamHandedOver",
    "StreamInterrupted",
    "StreamNotFound",
    "StreamTooLarge",
    "TokenwireError",
    "error_from_dict",
]


class TokenwireError(Exception):
    """Root of every error tokenwire raises on purpose."""

    status_code: int = 500
    #: Short machine-readable kind, used as the ``type`` of error events.
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, str | None]:
        return {"type": self.error_type, "message": self.message, "code": self.code}


class RequestError(TokenwireError):
    status_code = 400
    error_type = "invalid_request_error"


class InvalidRequest(RequestError):
    pass


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class AuthenticationFailed(RequestError):
    status_code = 401
    error_type = "authentication_error"


class StreamNotFound(RequestError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFound(RequestError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist or is not served here.",
            param="model",
            code="model_not_found",
        )


class RouteNotFound(RequestError):
    status_code = 404
    error_type = "not_found_error"


class MethodNotAllowed(RequestError):
    status_code = 405


class StreamExpired(RequestError):
    status_code = 410
    error_type = "not_found_error"


class PayloadTooLarge(RequestError):
    status_code = 413


class Overloaded(RequestError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class BackendError(TokenwireError):
    status_code = 502
    error_type = "backend_error"


class BackendUnavailable(BackendError):
    status_code = 503
    error_type = "backend_unavailable"


class BackendProtocolError(BackendError):
    status_code = 502
    error_type = "backend_protocol_error"


class BackendTimeout(BackendError):
    status_code = 504
    error_type = "backend_timeout"


class OutputValidationError(TokenwireError):
    """The model's output broke ``response_format`` or a tool's parameter schema.

    Raised by the structured-output and tool stages at the first offending character;
    ``path`` is the JSONPath (``$.items[2].name``) where the output went wrong.
    """

    status_code = 502
    error_type = "output_validation_error"

    def __init__(self, message: str, *, path: str = "$", code: str = "json_schema_violation"):
        super().__init__(message, param=path, code=code)
        self.path = path

    def to_dict(self) -> dict[str, str | None]:
        return {**super().to_dict(), "path": self.path}


class StreamInterrupted(TokenwireError):
    """Raised by the client when a stream broke and resume attempts were spent."""

    error_type = "stream_interrupted"

    def __init__(self, message: str, *, partial_text: str = "", last_event_id: int = -1):
        super().__init__(message)
        self.partial_text = partial_text
        self.last_event_id = last_event_id


class StreamTooLarge(TokenwireError):
    """A stream wrote more than ``max_stream_bytes`` to its journal (server/limits.py)."""

    status_code = 413
    error_type = "stream_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="stream_too_large")


class JournalError(TokenwireError):
    error_type = "journal_error"


def error_from_dict(error: dict[str, object]) -> TokenwireError:
    """Rebuild a typed error from a ``stream.failed`` event's ``error`` (for non-streaming
    responses, which answer with the failure's own status)."""
    kind = str(error.get("type") or "server_error")
    cls: type[TokenwireError] = TokenwireError
    pending: list[type[TokenwireError]] = [TokenwireError]
    while pending:  # breadth-first: the most general class with that error_type wins
        candidate = pending.pop(0)
        if candidate.error_type == kind:
            cls = candidate
            break
        pending.extend(candidate.__subclasses__())
    exc = cls.__new__(cls)
    TokenwireError.__init__(exc, str(error.get("message") or "stream failed"))
    exc.error_type = kind
    code = error.get("code")
    exc.code = str(code) if code is not None else None
    if isinstance(exc, OutputValidationError):
        exc.path = str(error.get("path") or "$")
        exc.param = exc.path  # OpenAI's error shape names the JSON path as the param
    return exc


class StreamHandedOver(JournalError):
    """The store refused an append: another replica claimed the stream (it presumed this
    producer lost, or this one released it). The producer stops without a terminal event:
    the stream goes on, produced elsewhere."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="handed_over")
