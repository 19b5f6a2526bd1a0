"""The HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies come from the protocols' pydantic wire models (``model_json_schema``), so the
document cannot drift from what ``parse`` accepts; responses and the error shapes are written
out here. Streaming answers are ``text/event-stream``; docs/ holds the event reference. The
schemathesis fuzz test (tests/test_fuzz.py) runs against this document.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from tokenwire import __version__
from tokenwire.protocols.anthropic_messages import MessagesRequest
from tokenwire.protocols.openai_chat import ChatCompletionRequest

__all__ = ["document", "endpoint"]

_REF = "#/components/schemas/{model}"

_OPENAI_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ANTHROPIC_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}

_STATUSES = {
    "400": "Invalid request",
    "401": "Missing or invalid API key",
    "404": "Unknown model or stream (another key's stream is unknown too)",
    "410": "The stream expired",
    "413": "Request body too large",
    "429": "Rate limited, queue full or too many concurrent streams (see Retry-After)",
}


def _errors(schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {
        code: {"description": text, "content": {"application/json": {"schema": ref}}}
        for code, text in _STATUSES.items()
    }


def _stream_or_json(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Stream-Id": {"schema": {"type": "string"}}},
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }


def _body(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF, by_alias=True)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
    }


_STREAM_ID = {
    "name": "stream_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}


@functools.cache
def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": _OPENAI_ERROR, "AnthropicError": _ANTHROPIC_ERROR}
    chat = _body(ChatCompletionRequest, schemas)
    messages = _body(MessagesRequest, schemas)
    security: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenwire",
            "version": __version__,
            "description": "Streaming-first LLM server and gateway. Streaming responses are "
            "SSE with `id: <seq>`; resume with Last-Event-ID on GET /v1/streams/{stream_id}.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "security": security,
                    "requestBody": chat,
                    "responses": {
                        "200": _stream_or_json("A completion, or its SSE stream"),
                        **_errors("Error"),
                    },
                }
            },
            "/v1/messages": {
                "post": {
                    "operationId": "createMessage",
                    "security": security,
                    "requestBody": messages,
                    "responses": {
                        "200": _stream_or_json("A message, or its SSE stream"),
                        **_errors("AnthropicError"),
                    },
                }
            },
            "/v1/streams": {
                "post": {
                    "operationId": "startStream",
                    "security": security,
                    "requestBody": chat,
                    "responses": {
                        "200": _stream_or_json("Native events as SSE"),
                        **_errors("Error"),
                    },
                }
            },
            "/v1/streams/{stream_id}": {
                "get": {
                    "operationId": "resumeStream",
                    "security": security,
                    "parameters": [
                        _STREAM_ID,
                        {"name": "after", "in": "query", "schema": {"type": "integer"}},
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _stream_or_json("Replay after the given seq, then live"),
                        **_errors("Error"),
                    },
                }
            },
            "/v1/streams/{stream_id}/cancel": {
                "post": {
                    "operationId": "cancelStream",
                    "security": security,
                    "parameters": [_STREAM_ID],
                    "responses": {
                        "200": {
                            "description": "Stop accepted",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors("Error"),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": security,
                    "responses": {
                        "200": {
                            "description": "Models, `default` first",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors("Error"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "responses": {
                        "200": {
                            "description": "Up",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }


async def endpoint(request: Request) -> Response:
    return Response(orjson.dumps(document()), media_type="application/json")
