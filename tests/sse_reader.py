"""A small SSE reader for resume tests: reads one connection and can cut it at any byte.

A cut drops the connection mid-message, as a flaky network does; the incomplete tail is
discarded and the last complete message's ``id`` is what a client resumes from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["TERMINAL", "Frame", "Segment", "parse_frames", "payload_of", "read_segment", "text_of"]

TERMINAL = ("stream.completed", "stream.cancelled", "stream.failed")


@dataclass
class Frame:
    id: int | None
    event: str | None
    data: str


def parse_frames(buffer: bytes) -> tuple[list[Frame], bytes]:
    """Complete SSE messages in ``buffer`` and the incomplete tail (dropped on a cut)."""
    frames = []
    *blocks, tail = buffer.split(b"\n\n")
    for block in blocks:
        fid: int | None = None
        name: str | None = None
        data: list[str] = []
        for line in block.decode().split("\n"):
            if line.startswith("id: "):
                fid = int(line[4:])
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            frames.append(Frame(fid, name, "\n".join(data)))
    return frames, tail


@dataclass
class Segment:
    frames: list[Frame] = field(default_factory=list)
    stream_id: str | None = None
    finished: bool = False
    first_text_at: float | None = None
    finished_at: float | None = None


def read_segment(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    cut_after: int | None = None,
) -> Segment:
    """One connection: read until the stream ends or ``cut_after`` body bytes, then drop."""
    segment = Segment()
    buffer = b""
    received = 0
    with client.stream(method, url, json=body, headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        segment.stream_id = response.headers["x-stream-id"]
        for chunk in response.iter_raw():
            if cut_after is not None and received + len(chunk) > cut_after:
                chunk = chunk[: cut_after - received]
            received += len(chunk)
            frames, buffer = parse_frames(buffer + chunk)
            for frame in frames:
                segment.frames.append(frame)
                if segment.first_text_at is None and text_of(frame):
                    segment.first_text_at = time.monotonic()
                if is_terminal(frame):
                    segment.finished = True
                    segment.finished_at = time.monotonic()
            if segment.finished or (cut_after is not None and received >= cut_after):
                break  # leaving the block closes the connection mid-stream
    return segment


def payload_of(frame: Frame) -> Any:
    return None if frame.data == "[DONE]" else json.loads(frame.data)


def text_of(frame: Frame) -> str:
    payload = payload_of(frame)
    if not isinstance(payload, dict):
        return ""
    if payload.get("type") == "text.delta":
        return str(payload["text"])
    choices = payload.get("choices") or []
    if choices:
        return str(choices[0]["delta"].get("content") or "")
    return ""


def is_terminal(frame: Frame) -> bool:
    if frame.data == "[DONE]":
        return True
    payload = payload_of(frame)
    return isinstance(payload, dict) and payload.get("type") in TERMINAL
