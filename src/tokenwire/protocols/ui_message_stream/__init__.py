"""The AI SDK's UI message stream: a drop-in backend for ``useChat``, with resume and Stop.

One protocol in four modules: ``request`` (the body and the conversation), ``renderer`` (the
chunks), ``routes`` (the endpoints, one running answer per chat, and ``PROTOCOL``),
``websocket`` (ai@7's WebSocket transport).

Routes (``/api/chat`` by default; ``--ui-chat-path`` moves them):

- ``POST /api/chat``: the body ``DefaultChatTransport`` sends (``id`` = chat id, ``messages``
  as UIMessages with ``parts``, ``trigger``, ``messageId``; other keys tolerated, a few read:
  ``model``, ``system``, ``temperature``, ``topP``, ``seed``, ``maxOutputTokens``,
  ``stopSequences``). Answers the UI message stream as SSE: ``start{messageId}``,
  ``start-step``, ``text-start``/``text-delta``/``text-end``, tool parts, ``data-*`` parts,
  ``finish-step``, ``finish{finishReason}``, then ``data: [DONE]``.
- ``GET /api/chat/{id}/stream``: the chat's running answer from its ``start`` (same
  ``messageId``; the SDK's ``DefaultChatTransport`` treats a resume as a replay), then live,
  on any replica sharing the journal; **204** with no body when nothing runs. Costs one
  lookup: no model work.
- ``POST /api/chat/{id}/stop`` and ``DELETE /api/chat/{id}/stream`` (the SDK example's
  form): Stop. Readers get the open text block closed, ``abort``, ``[DONE]``. A body or query
  naming the answer (``messageId``, or ``activeStreamId`` = the ``X-Stream-Id``) that is not
  the running one is stale and stops nothing (``{"stopped": false}``), so a late Stop never
  cancels a newer answer.
- ``WEBSOCKET /api/chat``: ai@7's ``WebSocketChatTransport`` (``send`` / ``resume`` /
  ``abort`` frames in; ``chunk{sequence}`` / ``end`` / ``error`` / ``no-active`` out).
  ``abort`` is Stop; a closed socket is a disconnect (the answer goes on, resumable).

A chat has one running answer: tokenwire names the stream by ``(API key, chat id)`` while it
runs (``Context.name_stream``), and a second POST for a chat whose answer still streams gets
**409** (the SDK never sends one: ``useChat`` waits for the answer or stops it first).

Deliberate divergences, and why:
- The chunk set follows the client's major version (``--ui-chat-version``, 6 by
  default, or ``uiMessageStreamVersion`` in the body): ai@5.0's schema is strict and throws
  on ``finish.finishReason`` and ``abort.reason``, which 6 and 7 read. Nothing else differs.
- Positions ride in SSE ``id:`` lines only (the client ignores them): the SDK's schema has no
  field for them, and a resume replays from ``start`` anyway.
- Progress (queue position, prefill, server-side tools running) is a transient ``data-progress``
  part: ``onData`` sees it, the message keeps none of it. A guard that fired is a persistent
  ``data-guard`` part, so the UI can say why the answer stopped.
- Usage travels as ``finish.messageMetadata.usage``.
"""

from tokenwire.protocols.ui_message_stream.renderer import DONE, Renderer
from tokenwire.protocols.ui_message_stream.request import ChatBody
from tokenwire.protocols.ui_message_stream.routes import PROTOCOL, ChatBusy, UIMessageStream

__all__ = ["DONE", "PROTOCOL", "ChatBody", "ChatBusy", "Renderer", "UIMessageStream"]
