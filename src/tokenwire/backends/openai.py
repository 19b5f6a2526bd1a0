"""Upstream: any OpenAI-compatible chat-completions server (vLLM, TGI, llama.cpp's server,
Ollama, OpenAI, LiteLLM, another tokenwire).

Streams ``POST {url}/chat/completions`` with ``stream_options.include_usage``; the body and
the decoding of its chunks are the wire's codec (``codecs/openai.py``). What is this
backend's own: an older server that refuses ``stream_options`` is asked again without it,
and from then on never sent it (usage is then passed through only if sent unasked); a stream
taken over by another replica is continued with the partial answer as a final assistant
message where the upstream's ``prefill`` setting says how it continues one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenwire.backends._upstream import UpstreamBackend
from tokenwire.codecs import openai as wire
from tokenwire.requests import ChatRequest, Message

__all__ = ["OpenAIBackend"]


class OpenAIBackend(UpstreamBackend):
    path = wire.PATH
    #: Cleared when the upstream refuses ``stream_options`` (older servers).
    send_stream_options = True

    def build_request(self, request: ChatRequest, model: str) -> tuple[str, dict[str, Any]]:
        body = wire.chat_body(request, model)
        if not self.send_stream_options:
            del body["stream_options"]
        if request.continue_final_message and self.config.prefill == "continue_final_message":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return self.base_url + self.path, body

    def continuation(self, request: ChatRequest, partial: str) -> ChatRequest | None:
        """The partial answer as a final assistant message, where the upstream is configured
        to continue one (``prefill``); ``max_tokens`` counts from the takeover."""
        if self.config.prefill not in ("continue_final_message", "assistant"):
            return None
        if request.tools or request.response_format.type != "text":
            return None
        messages = [*request.messages, Message(role="assistant", content=partial)]
        return dataclasses.replace(request, messages=messages, continue_final_message=True)

    def retry_body(self, body: dict[str, Any], rejection: str) -> dict[str, Any] | None:
        if "stream_options" in body and "stream_options" in rejection:
            self.send_stream_options = False
            return {key: value for key, value in body.items() if key != "stream_options"}
        return None

    def decoder(self) -> wire.ChatDecoder:
        return wire.ChatDecoder()

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return wire.auth_headers(key)
