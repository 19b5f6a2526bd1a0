"""The registry: every wire protocol the server speaks, one line each.

``create_app`` builds its routes, error shapes and ``/openapi.json`` from ``PROTOCOLS`` (names
must be unique: a stream renders in the protocol whose ``name`` it recorded). The first
protocol's error shape answers for routes no protocol owns (``/v1/models``, unknown paths).
Adding a protocol: write its module (protocols/base.py says what it declares), add it here.
"""

from __future__ import annotations

from tokenwire.protocols import (
    anthropic_messages,
    native,
    openai_chat,
    openai_responses,
    ui_message_stream,
)
from tokenwire.protocols.base import WireProtocol

__all__ = ["PROTOCOLS"]

PROTOCOLS: tuple[WireProtocol, ...] = (
    openai_chat.PROTOCOL,
    anthropic_messages.PROTOCOL,
    native.Native(body=openai_chat.PROTOCOL),
    openai_responses.PROTOCOL,
    ui_message_stream.PROTOCOL,
)
