"""Server-sent events: splitting an upstream byte stream into events, and writing events."""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator

DONE = b"data: [DONE]\n\n"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def split_events(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yields each complete event (without its blank line) as soon as its last byte arrived."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        start = 0
        for end in _EVENT_END.finditer(buffer):
            yield buffer[start:end.start()]
            start = end.end()
        buffer = buffer[start:]
    if buffer.strip():
        yield buffer


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of an event, or None if it has none (comments, keep-alives)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def data_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
