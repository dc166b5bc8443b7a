"""Chat chunks as the DCE extension v1.2.0 reads them.

The extension ends a tab at the first chunk whose choices[0].finish_reason is not exactly null (a
missing field included) and never shows that chunk's text, nor a top-level `error`. vLLM 0.32 puts
the last token in the chunk that carries finish_reason, so each such chunk is split in two, as
OpenAI's own streams end: the text with finish_reason null, then an empty delta with the reason.
"""

from __future__ import annotations

import re
from typing import Iterator

from .errors import ApiError

# Delta fields that carry something the client shows or uses.
_CONTENT_FIELDS = ("content", "reasoning", "reasoning_content", "tool_calls")
# A chunk exactly as vLLM 0.32 writes most of a chat stream (compact JSON, its own key order): one
# choice, index 0, still open, whose delta is its role and content text or only its reasoning text;
# then vLLM's usage and null fields. Matched whole: a JSON string's quotes and backslashes are
# escaped inside it, so no text can end a string early or pass for a key.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_OPEN_CHUNK = re.compile(
    rb'\{"id":' + _STRING + rb',"object":"chat\.completion\.chunk","created":\d+,"model":' + _STRING
    + rb',"choices":\[\{"index":0,"delta":\{(?:(?:"role":"assistant",)?"content":' + _STRING
    + rb'|"reasoning":(?P<reasoning>' + _STRING + rb'))(?P<delta_end>\}),"logprobs":null,"finish_reason":null'
    + rb'(?:,"token_ids":null)?\}\](?:,"usage":\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})?(?:,"[a-z_]+":null)*\}')


def mirror_reasoning(part: object) -> None:
    """vLLM now says `reasoning`; the extension reads `reasoning_content`. Give it both."""
    if not isinstance(part, dict):
        return
    if part.get("reasoning") is not None and part.get("reasoning_content") is None:
        part["reasoning_content"] = part["reasoning"]
    elif part.get("reasoning_content") is not None and part.get("reasoning") is None:
        part["reasoning"] = part["reasoning_content"]


def choices(payload: dict) -> list:
    """The well-formed choices of a chunk or an answer."""
    found = payload.get("choices")
    if not isinstance(found, list):
        return []
    return [choice for choice in found if isinstance(choice, dict) and isinstance(choice.get("index", 0), int)]


def _carries_content(delta: object) -> bool:
    return isinstance(delta, dict) and any(delta.get(name) for name in _CONTENT_FIELDS)


def for_extension_bytes(data: bytes) -> bytes | None:
    """What for_extension sends for a chunk of vLLM's (a whole event's data), made from its bytes
    without decoding them, for the chunks most of a stream is made of (_OPEN_CHUNK): sent as they
    are, or with the reasoning text mirrored. None for every other chunk: it must be decoded. A None
    where bytes would do only costs time; bytes must be exactly what for_extension would send."""
    found = _OPEN_CHUNK.fullmatch(data)
    if found is None:
        return None
    if found["reasoning"] is None:
        return data
    cut = found.start("delta_end")
    return data[:cut] + b',"reasoning_content":' + found["reasoning"] + data[cut:]


def for_extension(payload: dict) -> Iterator[dict]:
    """The chunks to send for one of vLLM's: the same chunk (reasoning mirrored, an explicit
    finish_reason null where it was missing), or, when a finishing choice carries content, that
    content with finish_reason null followed by an empty-delta chunk with the finish_reason.
    Chunks without choices (the usage chunk) pass unchanged."""
    found = choices(payload)
    finishing = []
    for choice in found:
        mirror_reasoning(choice.get("delta"))
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = None
        elif _carries_content(choice.get("delta")):
            finishing.append(choice)
    if not finishing:
        yield payload
        return
    # The content first, with every finishing choice held open (finish_reason null) ...
    content = [choice for choice in found if choice["finish_reason"] is None or choice in finishing]
    head = {name: value for name, value in payload.items() if name != "usage"}
    yield {**head, "choices": [_held_open(choice) if choice in finishing else choice for choice in content]}
    # ... then the end of each finishing choice, with nothing left to show.
    yield {**payload, "choices": [_ended(choice) for choice in found if choice["finish_reason"] is not None]}


def _held_open(choice: dict) -> dict:
    held = {**choice, "finish_reason": None}
    if "stop_reason" in held:
        held["stop_reason"] = None
    return held


def _ended(choice: dict) -> dict:
    ended = {name: value for name, value in choice.items() if name != "logprobs"}
    ended["delta"] = {}
    return ended


def error_chunks(error: ApiError) -> list[dict]:
    """A failed stream, shown in the tab: the reason as text (with the OpenAI error object, for other
    clients), then the end of the tab with finish_reason "error"."""
    return [
        {**error.body(), "object": "chat.completion.chunk", "choices": [{
            "index": 0, "delta": {"content": f"\n\n[DCE proxy error: {error.message}]"}, "finish_reason": None}]},
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]},
    ]
