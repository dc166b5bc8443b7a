"""Server-sent events: splitting an upstream byte stream into events, and writing events and heartbeats."""

from __future__ import annotations

import json
import re

DONE = b"data: [DONE]\n\n"
# An SSE comment: clients ignore it, but it keeps their socket (and every proxy on the way) from
# timing out while vLLM is silent.
HEARTBEAT = b": keep-alive\n\n"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class LineMatch:
    """A pattern that starts at a line's start (`(?:^|\\n)`), looked for only in bytes that hold one
    of the words it needs. Python's regex engine tries such a pattern at every byte (about 10 ns
    each: 4 µs of a busy worker's ~27 µs per chat event went to two of them), where `in` skips
    through bytes at memory speed; the pattern alone decides."""

    def __init__(self, pattern: bytes, *words: bytes):
        self._regex = re.compile(pattern)
        self._words = words

    def found_in(self, data: bytes) -> bool:
        return any(word in data for word in self._words) and self._regex.search(data) is not None


# [DONE] as an event of its own: JSON holds no raw line break, so text that says it never matches.
_DONE_EVENT = LineMatch(rb"(?:^|\n)data: ?\[DONE\]\r?(?:\n|$)", b"[DONE]")


class EventSplitter:
    """Cuts an upstream byte stream into complete events as bytes arrive. The start of an event
    waits until its end arrives; each byte is looked at once, however many reads an event spans."""

    def __init__(self):
        self._pending: list[bytes] = []  # the start of an event still without its end
        self._tail = b""  # the last bytes of _pending: an event's end may straddle two reads

    def whole(self, chunk: bytes) -> bytes:
        """The events completed by `chunk`, byte for byte, each with its blank line."""
        tail = self._tail
        cut = _end_of_last_event(tail + chunk) - len(tail)
        if cut <= 0:
            if chunk:
                self._pending.append(chunk)
                self._tail = (tail + chunk)[-3:]
            return b""
        ready = b"".join(self._pending) + chunk[:cut]
        rest = chunk[cut:]
        self._pending, self._tail = ([rest] if rest else []), rest[-3:]
        return ready

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by `chunk`, each without its blank line."""
        ready = self.whole(chunk)
        return (ready.split(b"\n\n") if b"\r" not in ready else _EVENT_END.split(ready))[:-1]

    def rest(self) -> list[bytes]:
        """The last event, when the stream ended without its blank line."""
        rest, self._pending, self._tail = b"".join(self._pending), [], b""
        return [rest] if rest.strip() else []


def _end_of_last_event(data: bytes) -> int:
    if b"\r" not in data:  # as vLLM writes its events: a plain search, several times faster
        found = data.rfind(b"\n\n")
        return found + 2 if found >= 0 else 0
    last = 0
    for end in _EVENT_END.finditer(data):
        last = end.end()
    return last


def split_whole(events: bytes) -> list[bytes]:
    """Whole events (EventSplitter.whole) cut apart, each with its own blank line."""
    cut, start = [], 0
    for end in _EVENT_END.finditer(events):
        cut.append(events[start:end.end()])
        start = end.end()
    return cut


def has_done(events: bytes) -> bool:
    return _DONE_EVENT.found_in(events)


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of an event, or None if it has none (comments, keep-alives)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def event_json(data: bytes) -> dict | None:
    """An event's data as a JSON object, or None."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def data_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
