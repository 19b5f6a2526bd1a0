"""The Responses API's renderer: journal events as Responses events and Response objects.

Several wire events come from one journal event (an output item opens, its parts open, its
text streams, each closes), numbered by the renderer's own ``sequence_number``; the same
events always render the same payloads, so any replica can resume a stream by re-rendering.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

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
    ToolResult,
    Usage,
)
from tokenwire.journal.base import StreamMeta
from tokenwire.protocols.base import Payload, Renderer
from tokenwire.protocols.conversation import message_from_dict
from tokenwire.protocols.openai_responses.request import items_to_messages
from tokenwire.requests import Message

__all__ = ["ID_PREFIX", "ResponsesRenderer", "history", "response_id", "snapshot"]

ID_PREFIX = "resp_"


def response_id(stream_id: str) -> str:
    return ID_PREFIX + stream_id


#: The terminal event type for each final status.
_TERMINAL = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.cancelled",
}

_RESPONSE_ERROR_CODES = {"rate_limit_error": "rate_limit_exceeded"}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens or 0,
            "cache_write_tokens": 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponsesRenderer(Renderer):
    """One response's events as Responses API events, numbered by ``sequence_number``.

    Deterministic: the same events give the same payloads, on any replica, so a resume
    re-renders from the start and skips what the client has. ``response()`` is the Response
    object as of the events rendered so far (what ``GET`` polls and the POST answers).
    """

    event_names = True
    needs_history = True
    position_key: ClassVar[str | None] = "sequence_number"
    #: Native-only detail: the Responses API's events have no place for these.
    drops = frozenset({Progress.type, JsonPartial.type, GuardTriggered.type, ToolResult.type})

    def __init__(self, meta: StreamMeta) -> None:
        super().__init__(meta)
        self._echo: dict[str, Any] = dict(meta.render.get("response") or {})
        self._id = response_id(meta.id)
        self._stream_id = meta.id
        self._seq = 0
        self._status = "queued" if self._echo.get("background") else "in_progress"
        self._output: list[dict[str, Any]] = []
        self._message: int | None = None  # output index of the open message
        self._message_id = ""
        self._text: list[str] = []
        self._calls: dict[int, int] = {}  # tool call index -> output index
        self._open_calls: set[int] = set()  # output indices of unfinished calls
        self._usage: Usage | None = None
        self._error: dict[str, Any] | None = None
        self._incomplete: dict[str, Any] | None = None
        self._started = False

    # -- the Response object ----------------------------------------------------------------

    @property
    def status(self) -> str:
        return self._status

    def response(self) -> dict[str, Any]:
        """The Response object as of now (a fresh dict)."""
        output = copy.deepcopy(self._output)
        if self._message is not None:
            output[self._message]["content"] = [self._part("".join(self._text))]
        return {
            "id": self._id,
            "object": "response",
            "created_at": self.meta.created,
            "status": self._status,
            "error": self._error,
            "incomplete_details": self._incomplete,
            "model": self.meta.model,
            "output": output,
            "usage": _usage(self._usage) if self._usage is not None else None,
            **self._echo,
        }

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _emit(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["sequence_number"] = self._seq
        self._seq += 1
        return payload

    def _lifecycle(self, kind: str) -> dict[str, Any]:
        return self._emit({"type": kind, "response": self.response()})

    # -- output items -----------------------------------------------------------------------

    def _open_message(self) -> list[Payload]:
        index = len(self._output)
        self._message = index
        self._message_id = f"msg_{self._stream_id}_{index}"
        self._text = []
        item = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self._output.append(item)
        return [
            self._emit(
                {"type": "response.output_item.added", "output_index": index, "item": dict(item)}
            ),
            self._emit(
                {
                    "type": "response.content_part.added",
                    "item_id": self._message_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": self._part(""),
                }
            ),
        ]

    def _close_message(self, status: str) -> list[Payload]:
        index = self._message
        if index is None:
            return []
        self._message = None
        text = "".join(self._text)
        item = self._output[index]
        item["content"] = [self._part(text)]
        item["status"] = status
        head = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            self._emit({"type": "response.output_text.done", **head, "text": text, "logprobs": []}),
            self._emit({"type": "response.content_part.done", **head, "part": self._part(text)}),
            self._emit(
                {
                    "type": "response.output_item.done",
                    "output_index": index,
                    "item": copy.deepcopy(item),
                }
            ),
        ]

    def _open_call(self, call_index: int, call_id: str, name: str) -> list[Payload]:
        out = self._close_message("completed")
        index = len(self._output)
        item = {
            "id": f"fc_{self._stream_id}_{index}",
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": call_id,
            "name": name,
        }
        self._output.append(item)
        self._calls[call_index] = index
        self._open_calls.add(index)
        out.append(
            self._emit(
                {"type": "response.output_item.added", "output_index": index, "item": dict(item)}
            )
        )
        return out

    def _close_call(self, index: int, status: str) -> list[Payload]:
        self._open_calls.discard(index)
        item = self._output[index]
        item["status"] = status
        return [
            self._emit(
                {"type": "response.output_item.done", "output_index": index, "item": dict(item)}
            )
        ]

    def _finish(self, status: str) -> list[Payload]:
        item_status = "completed" if status == "completed" else "incomplete"
        out = self._close_message(item_status)
        for index in sorted(self._open_calls):
            out.extend(self._close_call(index, "incomplete"))
        self._status = status
        out.append(self._lifecycle(_TERMINAL[status]))
        return out

    # -- render -----------------------------------------------------------------------------

    def render(self, event: Event) -> Sequence[Payload]:
        if type(event) is TextDelta:  # the hot one first
            return self._text_delta(event)
        if isinstance(event, StreamStarted):
            return self._stream_started()
        if isinstance(event, ToolCallStarted):
            return self._open_call(event.index, event.id, event.name)
        if isinstance(event, ToolCallDelta):
            return self._call_delta(event)
        if isinstance(event, ToolCallCompleted):
            return self._call_completed(event)
        if isinstance(event, Usage):
            self._usage = event
            return []
        if isinstance(event, StreamCompleted):
            return self._completed(event.finish_reason)
        if isinstance(event, StreamCancelled):
            return self._finish("cancelled")
        if isinstance(event, StreamFailed):
            return self._failed(event.error)
        return []  # ``drops``

    def _text_delta(self, event: TextDelta) -> list[Payload]:
        if not event.text:
            return []
        out = self._open_message() if self._message is None else []
        self._text.append(event.text)
        out.append(
            self._emit(
                {
                    "type": "response.output_text.delta",
                    "item_id": self._message_id,
                    "output_index": self._message,
                    "content_index": 0,
                    "delta": event.text,
                    "logprobs": [],
                }
            )
        )
        return out

    def _stream_started(self) -> list[Payload]:
        if self._started:
            return []  # a stream taken over by another replica goes on: one response
        self._started = True
        created = self._lifecycle("response.created")
        self._status = "in_progress"
        return [created, self._lifecycle("response.in_progress")]

    def _call_delta(self, event: ToolCallDelta) -> list[Payload]:
        index = self._calls.get(event.index)
        if index is None or index not in self._open_calls or not event.arguments_delta:
            return []
        self._output[index]["arguments"] += event.arguments_delta
        return [
            self._emit(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": self._output[index]["id"],
                    "output_index": index,
                    "delta": event.arguments_delta,
                }
            )
        ]

    def _call_completed(self, event: ToolCallCompleted) -> list[Payload]:
        done: list[Payload] = []
        index = self._calls.get(event.index)
        if index is None:  # a backend that only reports whole calls
            done = self._open_call(event.index, event.id, event.name)
            index = self._calls[event.index]
        item = self._output[index]
        item["arguments"] = event.arguments
        done.append(
            self._emit(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "name": item["name"],
                    "arguments": event.arguments,
                }
            )
        )
        done.extend(self._close_call(index, "completed"))
        return done

    def _completed(self, reason: str) -> list[Payload]:
        if reason == "length":
            self._incomplete = {"reason": "max_output_tokens"}
            return self._finish("incomplete")
        if reason == "content_filter":
            self._incomplete = {"reason": "content_filter"}
            return self._finish("incomplete")
        return self._finish("completed")

    def _failed(self, error: dict[str, Any]) -> list[Payload]:
        kind = str(error.get("type") or "server_error")
        message = str(error.get("message") or "the response failed")
        param = error.get("path") or error.get("param")
        self._error = {
            "code": _RESPONSE_ERROR_CODES.get(kind, "server_error"),
            "message": message,
            "type": kind,
            "param": param,
        }
        flat = self._emit(
            {
                "type": "error",
                "code": error.get("code") or kind,
                "message": message,
                "param": param,
            }
        )
        return [flat, *self._finish("failed")]


def snapshot(meta: StreamMeta, events: Sequence[Event]) -> ResponsesRenderer:
    """A renderer that has rendered ``events`` (its ``response()`` is the object now)."""
    renderer = ResponsesRenderer(meta)
    for event in events:
        renderer.render(event)
    return renderer


def history(meta: StreamMeta, events: Sequence[Event]) -> list[Message]:
    """The conversation a follow-up of this response continues: what came before it, its
    input and its output (its ``instructions`` are not carried over, as OpenAI's)."""
    messages = [message_from_dict(m) for m in meta.render.get("context") or []]
    items_to_messages(meta.render.get("input") or [], messages)
    items_to_messages(snapshot(meta, events).response()["output"], messages)
    return messages
