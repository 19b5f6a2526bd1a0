"""tokenwire: a streaming-first LLM server and gateway.

The public surface is small and pinned by ``tests/test_exported_members.py``.
"""

from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.client import AsyncClient, Client
from tokenwire.config import Settings
from tokenwire.errors import (
    BackendError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    StreamInterrupted,
    StreamNotFound,
    TokenwireError,
)
from tokenwire.events import (
    Event,
    GuardTriggered,
    JsonPartial,
    Progress,
    StreamCancelled,
    StreamCompleted,
    StreamFailed,
    StreamStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    Usage,
)
from tokenwire.journal import Journal, MemoryJournal
from tokenwire.requests import ChatRequest, Message, SamplingParams
from tokenwire.streams import StreamManager

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Backend",
    "BackendError",
    "CancelToken",
    "ChatRequest",
    "Client",
    "Event",
    "GuardTriggered",
    "InvalidRequest",
    "Journal",
    "JsonPartial",
    "MemoryJournal",
    "Message",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "Progress",
    "SamplingParams",
    "Settings",
    "StreamCancelled",
    "StreamCompleted",
    "StreamFailed",
    "StreamInterrupted",
    "StreamManager",
    "StreamNotFound",
    "StreamStarted",
    "TextDelta",
    "TokenwireError",
    "ToolCallCompleted",
    "ToolCallDelta",
    "ToolCallStarted",
    "Usage",
    "__version__",
]
