"""The registry: every wire protocol the server speaks, one line each.

The server builds its routes, error shapes and ``/openapi.json`` from ``PROTOCOLS``; a stream
is rendered by the protocol whose ``name`` it recorded (``protocol_named``). The first
protocol's error shape answers for routes no protocol owns (``/v1/models``, unknown paths).
Adding a protocol: write its module (protocols/base.py says what it declares), add it here.
"""

from __future__ import annotations

from tokenwire.protocols import anthropic_messages, native, openai_chat, openai_responses
from tokenwire.protocols.base import WireProtocol

__all__ = ["DEFAULT", "PROTOCOLS", "protocol_named"]

PROTOCOLS: tuple[WireProtocol, ...] = (
    openai_chat.PROTOCOL,
    anthropic_messages.PROTOCOL,
    native.Native(body=openai_chat.PROTOCOL),
    openai_responses.PROTOCOL,
)

#: The error shape of routes no protocol owns.
DEFAULT: WireProtocol = PROTOCOLS[0]

_BY_NAME: dict[str, WireProtocol] = {protocol.name: protocol for protocol in PROTOCOLS}
if len(_BY_NAME) != len(PROTOCOLS):
    raise RuntimeError("two protocols in the registry share a name")


def protocol_named(name: str) -> WireProtocol:
    """The protocol a stream was started in (``StreamMeta.protocol``)."""
    return _BY_NAME[name]
