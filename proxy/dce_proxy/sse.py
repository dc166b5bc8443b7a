"""Server-sent events: splitting an upstream byte stream into events, and writing events and heartbeats."""

from __future__ import annotations

import json
import re

DONE = b"data: [DONE]\n\n"
# An SSE comment: clients ignore it, but it keeps their socket (and every proxy on the way) from
# timing out while vLLM is silent.
HEARTBEAT = b": keep-alive\n\n"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class EventSplitter:
    """Cuts an upstream byte stream into complete events (without their blank line) as bytes arrive."""

    def __init__(self):
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk
        events, start = [], 0
        for end in _EVENT_END.finditer(buffer):
            events.append(buffer[start:end.start()])
            start = end.end()
        self._buffer = buffer[start:]
        return events

    def rest(self) -> list[bytes]:
        """The last event, when the stream ended without its blank line."""
        rest, self._buffer = self._buffer, b""
        return [rest] if rest.strip() else []


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of an event, or None if it has none (comments, keep-alives)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def data_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
