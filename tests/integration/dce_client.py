"""A client that behaves like the DCE extension v1.2.0 on the wire (its 'url' mode).

It sends the extension's exact body with only a Content-Type header, splits the SSE body on
blank lines, reads `data: ` lines, takes choices[0].delta.content / reasoning_content, treats a
non-null finish_reason as done and skips [DONE].
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field

import requests


def extension_body(prompt: str, **extra) -> dict:
    return {"model": "local-model", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16384, "stream": True, "reasoning_effort": "medium", "n": 1, **extra}


@dataclass
class ExtensionStream:
    status: int = 0
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    saw_done: bool = False
    chunks: int = 0
    errors: list = field(default_factory=list)


def post_like_extension(session: requests.Session, url: str, body: dict, *, on_chunk=None) -> ExtensionStream:
    result = ExtensionStream()
    with session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"},
                      stream=True, timeout=(10, 120)) as response:
        result.status = response.status_code
        if response.status_code != 200:
            result.errors.append(response.text)
            return result
        decoder = codecs.getincrementaldecoder("utf-8")()
        buffer = ""
        for raw in response.iter_content(chunk_size=None):
            buffer += decoder.decode(raw)
            *events, buffer = buffer.split("\n\n")
            for event in events:
                _read_event(event, result)
            if on_chunk is not None and on_chunk(result) is False:
                break  # the caller aborts this stream, like the extension's stop button
    return result


def _read_event(event: str, result: ExtensionStream) -> None:
    for line in event.split("\n"):
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            result.saw_done = True
            continue
        parsed = json.loads(data)
        if "error" in parsed:
            result.errors.append(parsed["error"])
        choice = parsed["choices"][0]
        delta = choice.get("delta") or {}
        result.content += delta.get("content") or ""
        result.reasoning += delta.get("reasoning_content") or ""
        result.chunks += 1
        if choice.get("finish_reason") is not None:
            result.finish_reason = choice["finish_reason"]
