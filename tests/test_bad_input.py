"""Bad input gets a 4xx in OpenAI's error shape, never a 500; failures after the headers end
the stream with an error event and [DONE], never silently."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tokenwire.errors import BackendError

from .conftest import RunningServer
from .scripted import ScriptedBackend, serve_app_in_thread

GOOD: dict[str, Any] = {
    "model": "default",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 4,
}


def post(server: RunningServer, content: bytes | None = None, **body: Any) -> httpx.Response:
    if content is not None:
        return httpx.post(
            f"{server.url}/v1/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
            timeout=30,
        )
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["message"], str)
    if param is not None:
        assert error["param"] == param, error
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**GOOD, "messages": "hello"}, "messages"),
        ({**GOOD, "max_tokens": "ten"}, "max_tokens"),
        ({**GOOD, "temperature": "hot"}, "temperature"),
        ({**GOOD, "stream": "yes please"}, "stream"),
        ({k: v for k, v in GOOD.items() if k != "messages"}, "messages"),
        ({k: v for k, v in GOOD.items() if k != "model"}, "model"),
        ({**GOOD, "messages": []}, "messages"),
        ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({**GOOD, "messages": [{"content": "hi"}]}, "messages.0.role"),
        ({**GOOD, "temperature": 3.5}, "temperature"),
        ({**GOOD, "top_p": 0}, "top_p"),
        ({**GOOD, "max_tokens": 0}, "max_tokens"),
        ({**GOOD, "presence_penalty": -9}, "presence_penalty"),
        ({**GOOD, "n": 2}, "n"),
        ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**GOOD, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_bodies_are_400_with_the_param(
    server: RunningServer, body: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(post(server, **body), 400)
    assert error["param"] is not None and error["param"].startswith(param)
    assert error["type"] == "invalid_request_error"


def test_n_greater_than_one_says_why(server: RunningServer) -> None:
    error = assert_openai_error(post(server, **{**GOOD, "n": 3}), 400, "n")
    assert "n > 1" in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2, 3]", b'"a string"', b"\xff\xfe"])
def test_malformed_json_is_400(server: RunningServer, raw: bytes) -> None:
    assert_openai_error(post(server, content=raw), 400)


def test_empty_message_content_is_400(server: RunningServer) -> None:
    assert_openai_error(
        post(server, **{**GOOD, "messages": [{"role": "user", "content": "   "}]}), 400, "messages"
    )


def test_unknown_model_is_404_in_openai_shape(server: RunningServer) -> None:
    error = assert_openai_error(post(server, **{**GOOD, "model": "gpt-17"}), 404, "model")
    assert error["code"] == "model_not_found" and "gpt-17" in error["message"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])


def test_prompt_longer_than_the_context_is_400(server: RunningServer) -> None:
    long_text = "lighthouse " * 6000  # well over the 4096-token context
    error = assert_openai_error(
        post(server, **{**GOOD, "messages": [{"role": "user", "content": long_text}]}), 400
    )
    assert error["code"] == "context_length_exceeded"
    assert "context" in error["message"]


def test_max_tokens_beyond_the_context_is_400(server: RunningServer) -> None:
    error = assert_openai_error(post(server, **{**GOOD, "max_tokens": 100_000}), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"


def test_a_bad_streaming_request_fails_before_any_stream(server: RunningServer) -> None:
    response = post(server, **{**GOOD, "stream": True, "temperature": -1})
    assert_openai_error(response, 400, "temperature")
    assert "x-stream-id" not in response.headers


def test_unknown_routes_and_methods_answer_in_openai_shape(server: RunningServer) -> None:
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing-here", timeout=10), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/chat/completions", timeout=10), 405)


def test_unknown_stream_id_is_404(server: RunningServer) -> None:
    assert_openai_error(httpx.get(f"{server.url}/v1/streams/nope", timeout=10), 404)
    assert_openai_error(httpx.post(f"{server.url}/v1/streams/nope/cancel", timeout=10), 404)


def test_bad_last_event_id_is_400(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json=GOOD, timeout=30)
    stream_id = response.headers["x-stream-id"]
    bad = httpx.get(
        f"{server.url}/v1/streams/{stream_id}", headers={"last-event-id": "abc"}, timeout=10
    )
    assert_openai_error(bad, 400, "after")


def test_failure_after_headers_ends_with_error_event_and_done() -> None:
    """A backend that fails mid-stream: the partial text arrives, then an error chunk, then
    [DONE]; the official client raises APIError after yielding the partial text."""
    backend = ScriptedBackend(pieces=["Hel", "lo", " wor", "ld"], fail_after=2)
    with serve_app_in_thread(backend, disconnect_grace=0) as url:
        body = {**GOOD, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            datas = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert datas[-1] == "[DONE]"
        error = json.loads(datas[-2])["error"]
        assert error["type"] == BackendError.error_type and "scripted failure" in error["message"]
        texts = [
            json.loads(d)["choices"][0]["delta"].get("content")
            for d in datas[:-2]
            if json.loads(d).get("choices")
        ]
        assert "".join(t for t in texts if t) == "Hello"

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        received = []
        with pytest.raises(openai.APIError, match="scripted failure"):
            for chunk in client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "x"}], stream=True
            ):
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
        assert "".join(received) == "Hello"

        # The partial output stays in the journal: a resume replays it and the failure.
        stream_id = r.headers["x-stream-id"]
        replay = httpx.get(f"{url}/v1/streams/{stream_id}", timeout=10).text
        assert '"content":"Hel"' in replay and "scripted failure" in replay


def test_non_streaming_failure_is_an_error_response_not_a_500() -> None:
    backend = ScriptedBackend(pieces=["a", "b"], fail_after=1)
    with serve_app_in_thread(backend, disconnect_grace=0) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=GOOD, timeout=30)
        error = assert_openai_error(response, 502)
        assert error["type"] == "backend_error"
