"""Upstream: an Anthropic Messages server (Anthropic's API, or anything speaking it).

Streams ``POST {url}/messages``; the body (system apart, tool results as ``tool_result``
blocks, turns merged to alternate, temperature clamped to 0..1) and the decoding of its
events are the wire's codec (``codecs/anthropic.py``). What is this backend's own:
``max_tokens``, which Anthropic requires, falls back to the upstream's configured value.
"""

from __future__ import annotations

from typing import Any

from tokenwire.backends._upstream import UpstreamBackend
from tokenwire.codecs import anthropic as wire
from tokenwire.requests import ChatRequest

__all__ = ["AnthropicBackend"]


class AnthropicBackend(UpstreamBackend):
    path = wire.PATH

    def build_request(self, request: ChatRequest, model: str) -> tuple[str, dict[str, Any]]:
        return self.base_url + self.path, wire.messages_body(request, model, self.config.max_tokens)

    def decoder(self) -> wire.MessagesDecoder:
        return wire.MessagesDecoder()

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return wire.auth_headers(key)
