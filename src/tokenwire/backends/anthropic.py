"""Upstream: an Anthropic Messages server (Anthropic's API, or anything speaking it).

Streams ``POST {url}/messages``; the body (system apart, tool results as ``tool_result``
blocks, turns merged to alternate, temperature clamped to 0..1) and the decoding of its
events are the wire's codec (``codecs/anthropic.py``). What is this backend's own:
``max_tokens``, which Anthropic requires, falls back to the upstream's configured value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenwire.backends._upstream import UpstreamBackend
from tokenwire.codecs import anthropic as wire
from tokenwire.requests import ChatRequest, Message

__all__ = ["AnthropicBackend"]


class AnthropicBackend(UpstreamBackend):
    path = wire.PATH

    def build_request(self, request: ChatRequest, model: str) -> tuple[str, dict[str, Any]]:
        return self.base_url + self.path, wire.messages_body(request, model, self.config.max_tokens)

    def continuation(self, request: ChatRequest, partial: str) -> ChatRequest | None:
        """The Messages API continues a final assistant turn (prefill); it refuses one that
        ends in white space, which is left for the model to write again. ``max_tokens``
        counts from the takeover: the gateway cannot count the partial answer's tokens."""
        if request.tools or request.response_format.type != "text":
            return None
        prefill = Message(role="assistant", content=partial.rstrip())
        messages = [*request.messages, prefill] if prefill.content else list(request.messages)
        return dataclasses.replace(request, messages=messages, continue_final_message=True)

    def decoder(self) -> wire.MessagesDecoder:
        return wire.MessagesDecoder()

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return wire.auth_headers(key)
