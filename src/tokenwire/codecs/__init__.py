"""Wire codecs: each wire tokenwire reads as a client, spoken once.

A codec is what the upstream backends (``backends/``) and the Python client (``client/``)
share about a wire: the one SSE decoder (``sse``), and per wire its request body, the
decoder of its streamed messages into tokenwire events (``openai``, ``anthropic``,
``native``, ``responses``; the interface is ``base.WireDecoder``), and what the client
needs to start a stream of it (``base.ClientWire``, each module's ``CLIENT``). Codecs know
bytes, JSON and events; they do no I/O. The layer sits above ``events``, ``requests`` and
``errors`` and below ``backends`` and ``protocols``, whose server-side renderers and
parsers are the other direction of the same wires.
"""

from tokenwire.codecs.base import ClientWire, WireDecoder, WireError
from tokenwire.codecs.sse import RawEvent, ServerSentEvent, SSEDecoder

__all__ = ["ClientWire", "RawEvent", "SSEDecoder", "ServerSentEvent", "WireDecoder", "WireError"]
