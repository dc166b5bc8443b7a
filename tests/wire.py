"""The DCE extension v1.2.0 on the wire, shared by the unit and integration suites.

What the extension sends (`extension_body`), how it reads the answer (`ExtensionReader`, read from
its llm.service.ts), a generic SSE parser, and small helpers every suite needs (`free_port`,
`wait_until`). The reader is deliberately as strict as the extension, never kinder:

- the body is split on blank lines; only `data: ` lines count; `[DONE]` is skipped;
- a chunk ends the tab when `data.choices?.[0]?.finish_reason !== null`: a missing field, or a
  missing or empty `choices`, ends it too, and that chunk's text is NOT shown;
- otherwise choices[0].delta.content and .reasoning_content are appended;
- a top-level `error` is never looked at;
- 60 s without a byte on the socket kills the request ("Socket timeout"); a non-200 fails the tab.
"""

from __future__ import annotations

import codecs
import json
import socket
import time
from dataclasses import dataclass
from typing import Callable

import requests

import figures

SILENCE_LIMIT = 60.0  # the extension's agentkeepalive socket timeout, in seconds
# A test holding long streams reads them this slowly (on_chunk sleeps): they only need to be
# running, and ten or twenty streams read at full speed would take the CPU the test needs for what
# it measures. The backpressure reaches vLLM, which then sends fewer, larger chunks.
HELD_STREAM_READ_PAUSE = 0.05


def extension_body(prompt: str, **extra) -> dict:
    """The exact body of one extension tab."""
    return {"model": "local-model", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16384, "stream": True, "reasoning_effort": "medium", "n": 1, **extra}


# -- SSE -----------------------------------------------------------------------------------------

@dataclass
class Sse:
    events: list[str]  # the data payload of each event, in order, [DONE] included
    comments: int  # comment lines (": keep-alive")


def parse_sse(raw: bytes | str) -> Sse:
    """Any SSE body: each event's joined `data:` lines, and how many comment lines it held."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    events, comments = [], 0
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments += 1
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append("\n".join(data))
    return Sse(events, comments)


def sse_events(raw: bytes | str) -> list[str]:
    return parse_sse(raw).events


# -- the extension's reader ----------------------------------------------------------------------

@dataclass
class ExtensionResult:
    status: int = 0
    content: str = ""  # what the tab shows as the answer
    reasoning: str = ""  # what the tab shows as thinking
    ended: bool = False  # an end chunk arrived (the tab is complete)
    finish_reason: str | None = None  # the end chunk's finish_reason (None without one, or when missing)
    saw_done: bool = False
    chunks: int = 0  # JSON chunks read, the end chunk included
    heartbeats: int = 0  # SSE comment lines
    unparsed: int = 0  # data lines that are not JSON
    failure: str | None = None  # why the tab failed: "Socket timeout", "HTTP 429", ...
    # Where a Socket timeout struck (for a test's report; the tab shows the same either way):
    # "connecting" (TCP), "waiting for the answer" (the TLS handshake or the headers) or "reading the answer".
    timed_out: str | None = None

    @property
    def shown(self) -> tuple[str, str | None]:
        """(content, finish_reason): the usual thing to compare."""
        return self.content, self.finish_reason


class ExtensionReader:
    """Applies the extension's rules to a body fed in byte chunks of any size."""

    def __init__(self, status: int = 200):
        self.result = ExtensionResult(status=status)
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""

    def feed(self, data: bytes) -> None:
        self._buffer += self._decoder.decode(data)
        *events, self._buffer = self._buffer.split("\n\n")
        for event in events:
            self._event(event)

    def close(self) -> ExtensionResult:
        """The body is over: an unterminated last event is still read, as the extension does."""
        if self._buffer:
            self._event(self._buffer)
            self._buffer = ""
        return self.result

    def _event(self, event: str) -> None:
        for line in event.split("\n"):
            if line.startswith(":"):
                self.result.heartbeats += 1
            elif line.startswith("data: "):
                self._data(line[len("data: "):])

    def _data(self, data: str) -> None:
        result = self.result
        if data == "[DONE]":
            result.saw_done = True
            return
        if result.ended:
            return  # the tab is complete: nothing after its end chunk is shown
        try:
            chunk = json.loads(data)
        except ValueError:
            result.unparsed += 1
            return
        result.chunks += 1
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        finish = first.get("finish_reason", "<missing>") if isinstance(first, dict) else "<missing>"
        if finish is not None:  # `!== null`: undefined ends the tab too
            result.ended = True
            result.finish_reason = None if finish == "<missing>" else finish
            return
        delta = first.get("delta")
        if isinstance(delta, dict):
            result.content += _text(delta.get("content"))
            result.reasoning += _text(delta.get("reasoning_content"))


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def read_extension_body(raw: bytes | str, status: int = 200) -> ExtensionResult:
    """The extension's reading of a complete body (unit tests)."""
    reader = ExtensionReader(status)
    if status != 200:
        reader.result.failure = http_failure(status, raw.encode() if isinstance(raw, str) else raw)
        return reader.result
    reader.feed(raw.encode() if isinstance(raw, str) else raw)
    return reader.close()


def http_failure(status: int, body: bytes) -> str:
    """Why a tab failed with an HTTP error: its status, and the error's code and message when the
    body is the stack's JSON error (the tab shows no more, but a test's failure should)."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"
    if not isinstance(error, dict) or "code" not in error:
        return f"HTTP {status}"
    return f"HTTP {status} ({error['code']}): {str(error.get('message'))[:200]}"


# Caddy's own answer when it could not reach the proxy: the stack never saw the request.
PROXY_UNREACHABLE = "HTTP 502 (proxy_unavailable)"


def post_like_extension(session: requests.Session, url: str, body: dict, *,
                        on_chunk: Callable[[ExtensionResult], bool | None] | None = None,
                        silence_limit: float = SILENCE_LIMIT) -> ExtensionResult:
    """One tab over a live connection: only a Content-Type header, no retries, and the request dies
    after `silence_limit` seconds without a byte. `on_chunk(result)` runs after each chunk of bytes;
    returning False closes the socket, like the stop button."""
    try:
        # The agent's one socket timeout covers connecting and the TLS handshake too.
        response = session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"},
                                stream=True, timeout=(silence_limit, silence_limit))
    except requests.Timeout as exc:
        stage = "connecting" if isinstance(exc, requests.ConnectTimeout) else "waiting for the answer"
        return ExtensionResult(failure="Socket timeout", timed_out=stage)
    except requests.ConnectionError as exc:
        return ExtensionResult(failure=f"Connection error: {exc}")
    with response:
        reader = ExtensionReader(response.status_code)
        if response.status_code != 200:
            reader.result.failure = http_failure(response.status_code, response.content)
            return reader.result
        try:
            for raw in response.iter_content(chunk_size=None):
                reader.feed(raw)
                if on_chunk is not None and on_chunk(reader.result) is False:
                    return reader.result
        except requests.RequestException as exc:  # requests wraps a read timeout in a ConnectionError
            timed_out = isinstance(exc, requests.ConnectionError) and "timed out" in str(exc).lower()
            reader.result.failure = "Socket timeout" if timed_out else f"Connection error: {exc}"
            reader.result.timed_out = "reading the answer" if timed_out else None
            return reader.result
    return reader.close()


OPENING_TRIES = 3


def open_held_tab(new_session: Callable[[], requests.Session], url: str, body: dict, *,
                  on_chunk: Callable[[ExtensionResult], bool | None] | None = None) -> ExtensionResult:
    """post_like_extension for tests about what happens once streams run (held, paused, aborted,
    cut), not about opening them: a connection that ended before any answer arrived is opened
    again, and counted in the figures' "retries needed". Measured on 2-core CI machines under load:
    a new connection now and then closes unanswered ("Remote end closed connection without
    response", or an EOF in the TLS handshake), and Caddy may not reach the
    proxy within its 10 s of tries while Docker's DNS starves (its JSON 502, proxy_unavailable).
    Anything the proxy answered, and a silence (Socket timeout), is never retried: the extension
    would show it. Three tries: a stall of the whole machine (measured: this process's 0.1-s ticks
    16 s late) outlasts Caddy's 10-s limit for request headers, and once cut two tries in a row."""
    for attempt in range(1, OPENING_TRIES + 1):
        with new_session() as session:
            result = post_like_extension(session, url, body, on_chunk=on_chunk)
        failure = result.failure or ""
        never_reached = (not result.status and failure.startswith("Connection error")) or \
            failure.startswith(PROXY_UNREACHABLE)
        if attempt == OPENING_TRIES or not never_reached:
            return result
        figures.add("retries", 1)
    raise AssertionError("unreachable")  # the loop returns


# -- small helpers -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01,
               state: Callable[[], str] | None = None):
    """Polls `predicate` until it is true and returns its value; AssertionError naming `what` on
    timeout, with what `state` says was there instead."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            instead = f"; instead: {state()}" if state is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{instead}")
        time.sleep(interval)
