"""Fuzzing: schemathesis against a real server from its OpenAPI document, hypothesis on parse.

- ``GET /openapi.json`` serves ``tokenwire.server.openapi.document()`` (request bodies are the
  pydantic wire models' schemas);
- schemathesis sends schema-valid and schema-violating requests to every operation of a real
  ``tokenwire serve`` (embedded model, ``--max-tokens-limit`` keeping generations short):
  never a 5xx, and every 4xx in the protocol's error shape;
- hypothesis: the protocols' ``parse`` raises nothing but ``InvalidRequest``, for arbitrary
  JSON and for bodies generated from the wire schemas.

The SSE decoder and the partial-JSON parser have their own property tests
(tests/test_sse_decoder.py, tests/test_jsonstream.py); they are not repeated here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tokenwire.errors import InvalidRequest
from tokenwire.events import TERMINAL_TYPES
from tokenwire.protocols import anthropic_messages, openai_chat
from tokenwire.server.openapi import document

from .conftest import RunningServer, tokenwire_server

KEY = "fuzz-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}

schema = schemathesis.openapi.from_dict(document())

_FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases every run: a failure here is reproducible
)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RunningServer]:
    with tokenwire_server(
        "--api-keys", KEY,
        "--max-tokens-limit", "4",
        "--disconnect-grace", "0",
        "--heartbeat", "1",
        "--max-body-bytes", "262144",
    ) as running:  # fmt: skip
        yield running


def test_openapi_document_is_served_and_describes_every_route(
    fuzz_server: RunningServer,
) -> None:
    served = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()
    assert served == document()
    assert served["openapi"].startswith("3.1")
    assert set(served["paths"]) >= {
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/streams",
        "/v1/streams/{stream_id}",
        "/v1/streams/{stream_id}/cancel",
        "/v1/models",
        "/healthz",
    }
    body = served["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(body["required"])


def _error_in_protocol_shape(path: str, response: Any) -> None:
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
    else:
        assert isinstance(body["error"]["message"], str) and body["error"]["type"], body


@pytest.mark.timeout(600)
@schema.parametrize()
@_FUZZ
def test_no_request_makes_a_server_error(case: Any, fuzz_server: RunningServer) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        # A random model name stops at the router (404); the model runs only for "default".
        case.body["model"] = "default"
    response = case.call(base_url=fuzz_server.url, headers=AUTH, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    _error_in_protocol_shape(case.path, response)


_text = st.text(min_size=1, max_size=40).filter(lambda t: t.strip() != "")
valid_chat = st.fixed_dictionaries(
    {
        "model": st.just("default"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": _text}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "seed": st.integers(0, 2**31 - 1),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4),
        "max_tokens": st.integers(1, 100_000),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
        "user": st.text(max_size=10),
    },
)


@pytest.mark.timeout(300)
@given(body=valid_chat)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_valid_requests_stream_to_exactly_one_typed_terminal(
    fuzz_server: RunningServer, body: dict[str, Any]
) -> None:
    with httpx.stream(
        "POST", f"{fuzz_server.url}/v1/streams", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        events = [orjson.loads(line[5:]) for line in response.iter_lines() if line[:5] == "data:"]
    assert [e["seq"] for e in events] == list(range(len(events)))
    terminal = [e for e in events if e["type"] in TERMINAL_TYPES]
    assert terminal == [events[-1]]
    if terminal[0]["type"] == "stream.failed":  # e.g. json_object cut at 4 tokens: typed
        assert terminal[0]["error"]["type"] != "server_error", terminal


# -- hypothesis on parse -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)

#: Keys the parsers look at, so random objects reach past the first type check.
_KEYS = st.sampled_from(
    [
        "model", "messages", "role", "content", "stream", "max_tokens", "stop", "tools",
        "tool_choice", "response_format", "stream_options", "type", "text", "name",
        "tool_calls", "tool_call_id", "system", "stop_sequences", "input_schema", "input",
        "id", "tool_use_id", "temperature", "top_p", "metadata", "json_schema", "schema",
    ]
)  # fmt: skip
keyed_objects = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_KEYS, children, max_size=6),
    max_leaves=30,
)

PARSERS = [openai_chat.parse, anthropic_messages.parse]


@pytest.mark.parametrize("parse", PARSERS, ids=["openai", "anthropic"])
@given(body=json_values | keyed_objects)
@settings(max_examples=300, deadline=None)
def test_parse_raises_only_invalid_request_on_any_json(parse: Any, body: Any) -> None:
    with contextlib.suppress(InvalidRequest):
        parse(body)


@pytest.mark.parametrize(
    ("path", "parse"),
    [
        ("/v1/chat/completions", openai_chat.parse),
        ("/v1/messages", anthropic_messages.parse),
    ],
    ids=["openai", "anthropic"],
)
def test_parse_raises_only_invalid_request_on_schema_generated_bodies(
    path: str, parse: Any
) -> None:
    strategy = schema[path]["POST"].as_strategy()

    @given(case=strategy)
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        try:
            request, _ = parse(case.body)
        except InvalidRequest:
            return
        assert request.messages  # what parses is usable

    check()
