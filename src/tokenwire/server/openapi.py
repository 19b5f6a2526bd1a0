"""The HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Paths come from the protocol registry: each protocol's endpoints with their request bodies
(the pydantic wire models' ``model_json_schema``, so the document cannot drift from what
``parse`` accepts) and its error shape (``WireProtocol.error_schema``). The server's own
routes (``/v1/models``, ``/healthz``) are written out here. Streaming answers are
``text/event-stream``; docs/ holds the event reference. The schemathesis fuzz test
(tests/test_fuzz.py) runs against this document.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.protocols.base import Endpoint, WireProtocol
from tokenwire.protocols.registry import PROTOCOLS

__all__ = ["document", "endpoint"]

_REF = "#/components/schemas/{model}"

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


def _answer(description: str, streams: bool) -> dict[str, Any]:
    if not streams:
        return {
            "description": description,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
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


def _error_schema(protocol: WireProtocol, schemas: dict[str, Any], default: bool) -> str:
    """The component name of ``protocol``'s error shape (protocols sharing one share it)."""
    for name, schema in schemas.items():
        if name.endswith("Error") and schema == protocol.error_schema:
            return name
    name = "Error" if default else f"{type(protocol).__name__}Error"
    schemas[name] = dict(protocol.error_schema)
    return name


def _operation(
    endpoint: Endpoint, error: str, schemas: dict[str, Any], security: list[dict[str, list[str]]]
) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": endpoint.operation_id, "security": security}
    if endpoint.parameters:
        operation["parameters"] = [dict(p) for p in endpoint.parameters]
    if endpoint.body is not None:
        operation["requestBody"] = _body(endpoint.body, schemas)
    operation["responses"] = {"200": _answer(endpoint.summary, endpoint.streams), **_errors(error)}
    return operation


@functools.cache
def document(protocols: tuple[WireProtocol, ...] = PROTOCOLS) -> dict[str, Any]:
    """The document of an app speaking ``protocols`` (by default the registry's)."""
    schemas: dict[str, Any] = {}
    security: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    paths: dict[str, dict[str, Any]] = {}
    default_error = _error_schema(protocols[0], schemas, default=True)
    for protocol in protocols:
        error = _error_schema(protocol, schemas, default=False)
        for endpoint in protocol.routes():
            if endpoint.operation_id is None or endpoint.method == "WEBSOCKET":
                continue
            paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(
                endpoint, error, schemas, security
            )
    paths["/v1/models"] = {
        "get": {
            "operationId": "listModels",
            "security": security,
            "responses": {
                "200": _answer("Models, `default` first", streams=False),
                **_errors(default_error),
            },
        }
    }
    paths["/healthz"] = {
        "get": {
            "operationId": "health",
            "responses": {"200": _answer("Up", streams=False)},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenwire",
            "version": version("tokenwire"),
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
        "paths": paths,
    }


async def endpoint(request: Request) -> Response:
    protocols = getattr(request.app.state, "protocols", PROTOCOLS)
    return Response(orjson.dumps(document(protocols)), media_type="application/json")
