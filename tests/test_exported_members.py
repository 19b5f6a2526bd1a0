"""The public surface is pinned: adding or removing a name is a deliberate change here."""

from __future__ import annotations

import tokenwire
import tokenwire.client


def test_top_level_exports() -> None:
    assert sorted(tokenwire.__all__) == sorted(
        [
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
    )
    for name in tokenwire.__all__:
        assert hasattr(tokenwire, name), name


def test_client_exports() -> None:
    assert sorted(tokenwire.client.__all__) == sorted(
        [
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
    )
    for name in tokenwire.client.__all__:
        assert hasattr(tokenwire.client, name), name
    # Modules behind the surface stay private.
    assert all(not name.startswith("_") or name == "__version__" for name in tokenwire.__all__)
