"""Exact token counts of an answer, from vLLM's own `usage`: every stream asks vLLM for it
(stream_options.include_usage), and a client is sent vLLM's usage only as it asked for it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import invalid
from .record import RequestRecord

# vLLM's usage object, as a key: a quote inside a JSON string is escaped, so text cannot match.
USAGE_KEY = re.compile(rb'"usage":\s*\{')
# An event carrying generated text: a chat delta's content, reasoning or tool-call arguments, a
# completion's text (an empty one, like the role chunk's "content":"", carries none).
_TEXT = re.compile(rb'"(?:content|reasoning|text|arguments)":\s*"[^"]')
# The Responses API says input and output for chat's prompt and completion.
_USAGE_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)":\s*(\d+)')
_USAGE_NAMES = {b"prompt_tokens": "prompt_tokens", b"completion_tokens": "completion_tokens",
                b"input_tokens": "prompt_tokens", b"output_tokens": "completion_tokens"}
# vLLM's usage in an event with choices (continuous_usage_stats), as vLLM writes it: after another
# field, holding numbers, nulls and at most one level of objects (completion_tokens_details).
_EVENT_USAGE = re.compile(rb',"usage":\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}')
_PROMPT_COUNT = re.compile(rb'"prompt_tokens":(\d+)')


@dataclass(frozen=True)
class UsageAsked:
    """What a client asked vLLM's usage for."""
    final: bool  # vLLM's usage event, after the last token
    every_event: bool  # usage in every event too (continuous_usage_stats)


def ask_for_usage(body: dict, *, in_every_event: bool) -> UsageAsked:
    """Makes a streamed request ask vLLM for its usage (`in_every_event`: in each event too, so a
    stream cut early still has vLLM's prompt count); returns what the client asked for itself."""
    sent = body.get("stream_options")
    if sent is not None and not isinstance(sent, dict):
        raise invalid("stream_options", "'stream_options' must be an object.")
    options = sent or {}
    for name in ("include_usage", "continuous_usage_stats"):
        if options.get(name) is not None and not isinstance(options[name], bool):
            raise invalid("stream_options", f"'stream_options.{name}' must be true or false.")
    # As vLLM reads it: a stream_options object asks for usage unless it says include_usage false.
    final = sent is not None and options.get("include_usage", True) is True
    every_event = final and options.get("continuous_usage_stats") is True
    forwarded = {**options, "include_usage": True}
    if every_event or in_every_event:
        forwarded["continuous_usage_stats"] = True
    elif options.get("continuous_usage_stats"):
        forwarded["continuous_usage_stats"] = False  # it asked for it without usage: none at all
    body["stream_options"] = forwarded
    return UsageAsked(final, every_event)


def as_asked(payload: dict, record: RequestRecord, asked: UsageAsked) -> dict | None:
    """Takes an event's usage into the record; returns the event as its client gets it: None for
    vLLM's usage event (usage, no choices) that it did not ask for, and without `usage` an event
    that has it only because the proxy asked."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return payload
    final = not payload.get("choices")
    record.take_usage(usage, final=final)
    if final:
        return payload if asked.final else None
    if asked.every_event:
        return payload
    return {name: value for name, value in payload.items() if name != "usage"}


def as_asked_bytes(data: bytes, record: RequestRecord, asked: UsageAsked) -> bytes | None:
    """as_asked for a chunk that has choices (the caller knows it does), on its bytes (an event's
    data): vLLM's prompt count taken, its usage taken out unless the client asked for it in every
    event. None when the usage is not in the shape vLLM writes: the event must then be decoded."""
    usages = data.count(b'"usage"')  # the key, or a text that is exactly "usage" (then: decoded)
    if usages == 0:
        return data
    found = _EVENT_USAGE.search(data) if usages == 1 else None
    prompt = _PROMPT_COUNT.search(found[0]) if found is not None else None
    if prompt is None:
        return None
    if record.prompt_tokens is None:
        record.take_usage({"prompt_tokens": int(prompt[1])}, final=False)
    return data if asked.every_event else data[:found.start()] + data[found.end():]


def count_text_events(events: bytes, record: RequestRecord) -> None:
    """Counts the events of relayed bytes that carry generated text (one token each at vLLM's
    default --stream-interval 1): a stream cut before vLLM's usage came is still counted."""
    record.saw_text_events(len(_TEXT.findall(events)))


def count_usage_at_end(tail: bytes, record: RequestRecord) -> None:
    """A whole answer's usage, read from its last bytes (vLLM writes `usage` after the choices, and
    after a response's output)."""
    _, found, usage = tail.rpartition(b'"usage":')
    if found:
        record.take_usage({_USAGE_NAMES[name]: int(value) for name, value in _USAGE_COUNT.findall(usage)},
                          final=True)
