"""Exact token counts of an answer, from vLLM's own `usage`: every stream asks vLLM for it
(stream_options.include_usage), and only a client that asked for it too is sent vLLM's usage event."""

from __future__ import annotations

import json
import re

from .errors import invalid
from .record import RequestRecord

# vLLM's usage object, as a key: a quote inside a JSON string is escaped, so text cannot match.
USAGE_KEY = re.compile(rb'"usage":\s*\{')
# An event carrying generated text: a chat delta's content or reasoning, a completion's text (an
# empty one, like the role chunk's "content":"", carries none).
_TEXT = re.compile(rb'"(?:content|reasoning|text)":\s*"[^"]')
_USAGE_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens)":\s*(\d+)')


def ask_for_usage(body: dict) -> bool:
    """Makes a streamed request ask vLLM for its usage; True if the client asked for it itself."""
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object.")
    asked = options.get("include_usage")
    if asked is not None and not isinstance(asked, bool):
        raise invalid("stream_options", "'stream_options.include_usage' must be true or false.")
    # vLLM adds usage to every event when continuous_usage_stats comes with include_usage: only if
    # the client asked for both.
    body["stream_options"] = {**options, "include_usage": True,
                              **({} if asked else {"continuous_usage_stats": False})}
    return bool(asked)


def count_text_events(events: bytes, record: RequestRecord) -> None:
    """Counts the events of relayed bytes that carry generated text (one token each at vLLM's
    default --stream-interval 1): a stream cut before vLLM's usage came is still counted."""
    record.saw_tokens(len(_TEXT.findall(events)))


def keeps_usage_event(payload: dict, record: RequestRecord, usage_asked: bool) -> bool:
    """Takes an event's usage into the record. False for vLLM's usage event (usage, no choices)
    when the client did not ask for it: it is not sent."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return True
    record.take_usage(usage)
    return usage_asked or bool(payload.get("choices"))


def json_object_of(data: bytes) -> dict | None:
    """An event's data as a JSON object, or None."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def count_usage_at_end(tail: bytes, record: RequestRecord) -> None:
    """A whole answer's usage, read from its last bytes (vLLM writes `usage` after the choices)."""
    _, found, usage = tail.rpartition(b'"usage":')
    if found:
        record.take_usage({name.decode(): int(value) for name, value in _USAGE_COUNT.findall(usage)})
