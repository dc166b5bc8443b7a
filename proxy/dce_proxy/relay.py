"""Turning vLLM's answer into the client's: JSON bodies, and the two ways to relay an event stream
(bytes passed through untouched, or each event rewritten)."""

from __future__ import annotations

import itertools
import json
import re
from typing import Callable, Iterator

import urllib3
from flask import Response, current_app, request

from .errors import ApiError, from_upstream, upstream_error_answer, upstream_garbage, upstream_unavailable
from .limits import current_slot
from .payload import fit_to_model
from .sse import DONE, EventSplitter, event_data
from .stream import stream_response
from .upstream import UpstreamStreamError, iter_body, read_all

# Per-event rewrite: takes the decoded event, returns the bytes to send (b"" to send nothing).
EventRewriter = Callable[[dict], bytes]
# Builds the event that tells the client its stream failed (the relay adds DONE).
ErrorEvent = Callable[[ApiError], bytes]

_EARLY_END = "vLLM ended the stream before it was complete."
# Enough of a whole answer's end to hold its usage and the fields vLLM may put after it (e.g. the
# prompt's token ids when asked for).
_USAGE_TAIL_BYTES = 65536
_USAGE_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens)":\s*(\d+)')


def stats() -> dict:
    """Token counts of this request, for the access log (filled in as the answer goes out)."""
    return request.environ.setdefault("dce.stats", {})


def upstream_error_response(upstream: urllib3.BaseHTTPResponse) -> Response:
    """vLLM's own error answer, passed through (errors.upstream_error_answer)."""
    try:
        body = read_all(upstream)
    except ApiError:
        body = b""
    return upstream_error_answer(upstream.status, body)


def read_json(upstream: urllib3.BaseHTTPResponse) -> tuple[bytes, dict]:
    """vLLM's JSON answer: its bytes (to pass on untouched) and their parsed form."""
    body = read_all(upstream)
    try:
        parsed = json.loads(body)
    except ValueError:
        raise upstream_garbage("vLLM's answer is not valid JSON.") from None
    if not isinstance(parsed, dict):
        raise upstream_garbage("vLLM's answer is not a JSON object.")
    usage = parsed.get("usage")
    if isinstance(usage, dict):
        stats().update(prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))
    return body, parsed


def json_body_response(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


class Passthrough:
    """Bytes go out exactly as vLLM sent them, each chunk as soon as it arrives."""

    stopped = False  # it never ends a stream on its own

    def __init__(self, error_event: ErrorEvent):
        self.error_event = error_event
        self.complete = False  # vLLM's [DONE] went out
        self.at_boundary = True  # between two events: a heartbeat may go out now
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        self._tail = (self._tail + chunk)[-len(DONE) - 4:]
        self.complete = self.complete or DONE.strip() in self._tail
        self.at_boundary = self._tail.endswith((b"\n\n", b"\r\n\r\n"))
        return chunk

    def end(self) -> bytes:
        return b"" if self.complete else self.error_event(upstream_unavailable(_EARLY_END)) + DONE


class Rewriter:
    """Each upstream event is decoded, rewritten and sent on its own, as soon as it is complete."""

    at_boundary = True  # it only ever sends whole events

    def __init__(self, rewrite: EventRewriter, error_event: ErrorEvent):
        self.error_event = error_event
        self.complete = False  # vLLM's [DONE] went out
        self.stopped = False  # the stream was ended here, on an error event
        self._rewrite = rewrite
        self._splitter = EventSplitter()

    def feed(self, chunk: bytes) -> bytes:
        return self._events(self._splitter.feed(chunk))

    def end(self) -> bytes:
        out = self._events(self._splitter.rest())
        if self.complete or self.stopped:
            return out
        return out + self.error_event(upstream_unavailable(_EARLY_END)) + DONE

    def _events(self, events: list[bytes]) -> bytes:
        out = b""
        for event in events:
            if self.complete or self.stopped:
                break
            out += self._event(event)
        return out

    def _event(self, event: bytes) -> bytes:
        data = event_data(event)
        if data is None:
            return b""
        if data.strip() == b"[DONE]":
            self.complete = True
            return DONE
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            self.stopped = True
            return self.error_event(upstream_garbage("vLLM sent an event that is not a JSON object.")) + DONE
        if isinstance(payload.get("error"), dict):
            self.stopped = True
            return self.error_event(from_upstream(payload["error"], 502)) + DONE
        return self._rewrite(payload)


def forward(path: str, body: dict, *, error_event: ErrorEvent, rewrite_event: EventRewriter | None = None,
            rewrite_json: Callable[[dict], dict] | None = None) -> Response:
    """Sends a checked body to vLLM (model and token budget fitted) and relays the answer."""
    upstream = current_app.extensions["dce_upstream"]
    fit_to_model(body, upstream.models())
    slot = current_slot()
    if body.get("stream"):
        relay = Passthrough(error_event) if rewrite_event is None else Rewriter(rewrite_event, error_event)
        return stream_response(upstream, path, json.dumps(body).encode(), relay, slot)
    if not slot.held:
        raise slot.refusal  # only a stream can wait in line: heartbeats keep its client
    answer = upstream.request("POST", path, body=json.dumps(body).encode(), stream=True,
                              timeout=upstream.whole_answer_timeout)
    if answer.status >= 400:
        if answer.status == 404:
            upstream.forget_models()  # the served model may have changed under us
        return upstream_error_response(answer)
    if rewrite_json is None:
        # vLLM sends headers only once the whole answer is generated: the GPU is done with it, and
        # a client reading it slowly must not hold the slot a next request of its key needs.
        slot.free()
        return _passed_through(answer)
    _, parsed = read_json(answer)
    return json_body_response(rewrite_json(parsed))


def _passed_through(answer: urllib3.BaseHTTPResponse) -> Response:
    """vLLM's whole answer (sent at once, when generation is over) goes on as it arrives: never
    parsed, never held whole. Only its first byte is checked (vLLM answers a JSON object), and its
    Content-Length goes on too, so a client sees an answer cut after that as cut."""
    chunks = iter_body(answer)
    try:
        first = next(chunks, b"")
    except UpstreamStreamError as exc:
        answer.close()
        raise exc.error from None
    if not first.lstrip().startswith(b"{"):
        answer.close()
        raise upstream_garbage("vLLM's answer is not a JSON object.")
    length = answer.headers.get("Content-Length")
    return Response(_rest_of(answer, first, chunks, stats(), int(length) if length else None),
                    mimetype="application/json", headers={"Content-Length": length} if length else None)


def _rest_of(answer: urllib3.BaseHTTPResponse, first: bytes, chunks: Iterator[bytes], counts: dict,
             length: int | None) -> Iterator[bytes]:
    """The answer's bytes; the usage at its end (vLLM's last fields) goes to `counts`, for the log.
    A cut (UpstreamStreamError) propagates: gunicorn then closes the client's connection at once,
    where a quiet end would leave the client waiting for the bytes its Content-Length promised."""
    tail, received, whole = b"", 0, False
    try:
        for chunk in itertools.chain([first], chunks):
            received += len(chunk)
            tail = (tail + chunk)[-_USAGE_TAIL_BYTES:]
            # Counted before the last bytes go out: a client may stop reading once it has them all.
            whole = received == length
            if whole:
                _count_usage(tail, counts)
            yield chunk
        if length is None:
            whole = True
            _count_usage(tail, counts)
    finally:
        # A connection read to its end goes back to the pool; one cut (or left by the client) does not.
        if whole:
            answer.release_conn()
        else:
            answer.close()


def _count_usage(tail: bytes, counts: dict) -> None:
    # The last "usage": key is vLLM's own: a quote inside a JSON string is escaped.
    _, found, usage = tail.rpartition(b'"usage":')
    if found:
        counts.update((name.decode(), int(value)) for name, value in _USAGE_COUNT.findall(usage))
