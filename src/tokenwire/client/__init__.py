"""The tokenwire client: typed event streams with resume, Stop and metrics.

``Client`` / ``AsyncClient`` speak tokenwire's native protocol, or read OpenAI chat
completions and Anthropic Messages streams from any server, as the same typed events.
See docs/client.md.
"""

from tokenwire.client._client import DEFAULT_BASE_URL, AsyncChat, AsyncClient, Chat, Client
from tokenwire.client._metrics import StreamMetrics, percentile
from tokenwire.client._protocols import ProtocolName
from tokenwire.client._sse import ServerSentEvent, SSEDecoder
from tokenwire.client._stream import AsyncChatStream, ChatResult, ChatStream, RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncChat",
    "AsyncChatStream",
    "AsyncClient",
    "Chat",
    "ChatResult",
    "ChatStream",
    "Client",
    "ProtocolName",
    "RetryPolicy",
    "SSEDecoder",
    "ServerSentEvent",
    "StreamMetrics",
    "percentile",
]
