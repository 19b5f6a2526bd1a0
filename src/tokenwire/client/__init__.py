"""The tokenwire client: typed event streams with resume, Stop and metrics.

``Client`` / ``AsyncClient`` speak tokenwire's native protocol, or read OpenAI chat
completions and Anthropic Messages streams from any server, as the same typed events.
See docs/client.md. The async classes are written once (``_async.py``); the sync ones are
generated from them (``_sync.py``, by ``scripts/unasync.py``).
"""

from tokenwire.client._async import AsyncChat, AsyncChatStream, AsyncClient
from tokenwire.client._client import DEFAULT_BASE_URL
from tokenwire.client._metrics import StreamMetrics, percentile
from tokenwire.client._protocols import ProtocolName
from tokenwire.client._stream import ChatResult, RetryPolicy
from tokenwire.client._sync import Chat, ChatStream, Client
from tokenwire.codecs.sse import ServerSentEvent, SSEDecoder

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
