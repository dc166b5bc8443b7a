"""Turning vLLM's answer into the client's: JSON bodies, and the two ways to relay an event stream
(bytes passed through untouched, or each event rewritten)."""

from __future__ import annotations

import itertools
import json
import re
from typing import Callable, Iterator

import urllib3
from flask import Response, current_app

from .errors import ApiError, from_upstream, upstream_error_answer, upstream_garbage, upstream_unavailable
from .payload import fit_to_model
from .record import RequestRecord, current_record
from .sse import DONE, EventSplitter, event_data
from .stream import stream_response
from .upstream import UpstreamStreamError, iter_body, read_all
from .usage import (USAGE_KEY, ask_for_usage, count_text_events, count_usage_at_end, json_object_of,
                    keeps_usage_event)

# Per-event rewrite: takes the decoded event, returns the bytes to send (b"" to send nothing).
EventRewriter = Callable[[dict], bytes]
# Builds the event that tells the client its stream failed (the relay adds DONE).
ErrorEvent = Callable[[ApiError], bytes]

_EARLY_END = "vLLM ended the stream before it was complete."
# Enough of a whole answer's end to hold its usage and the fields vLLM may put after it (e.g. the
# prompt's token ids when asked for).
_USAGE_TAIL_BYTES = 65536
_EVENT_END = re.compile(rb"\r?\n\r?\n")


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
        current_record().take_usage(usage)
    return body, parsed


def json_body_response(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


class Passthrough:
    """vLLM's events go out byte for byte as it sent them, each as soon as it is complete. Only its
    usage event is read, and held back from a client that did not ask for it."""

    stopped = False  # it never ends a stream on its own
    at_boundary = True  # it only ever sends whole events

    def __init__(self, error_event: ErrorEvent, record: RequestRecord, usage_asked: bool):
        self.error_event = error_event
        self.complete = False  # vLLM's [DONE] went out
        self._record = record
        self._usage_asked = usage_asked
        self._pending = b""  # the start of an event still to complete

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = _end_of_last_event(data)
        ready, self._pending = data[:cut], data[cut:]
        return self._relayed(ready) if ready else b""

    def end(self) -> bytes:
        # vLLM's last event without its blank line still goes out, ended, before anything else.
        out = self._relayed(self._pending + b"\n\n") if self._pending.strip() else b""
        self._pending = b""
        return out if self.complete else out + self.error_event(upstream_unavailable(_EARLY_END)) + DONE

    def _relayed(self, events: bytes) -> bytes:
        count_text_events(events, self._record)
        if USAGE_KEY.search(events):
            events = b"".join(self._usage_read(event) for event in _whole_events(events))
        self.complete = self.complete or DONE.strip() in events
        return events

    def _usage_read(self, event: bytes) -> bytes:
        data = event_data(event)
        payload = json_object_of(data) if data is not None else None
        if payload is None or keeps_usage_event(payload, self._record, self._usage_asked):
            return event
        return b""


class Rewriter:
    """Each upstream event is decoded, rewritten and sent on its own, as soon as it is complete."""

    at_boundary = True  # it only ever sends whole events

    def __init__(self, rewrite: EventRewriter, error_event: ErrorEvent, record: RequestRecord, usage_asked: bool):
        self.error_event = error_event
        self.complete = False  # vLLM's [DONE] went out
        self.stopped = False  # the stream was ended here, on an error event
        self._rewrite = rewrite
        self._record = record
        self._usage_asked = usage_asked
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
        payload = json_object_of(data)
        if payload is None:
            self.stopped = True
            return self.error_event(upstream_garbage("vLLM sent an event that is not a JSON object.")) + DONE
        if isinstance(payload.get("error"), dict):
            self.stopped = True
            return self.error_event(from_upstream(payload["error"], 502)) + DONE
        count_text_events(data, self._record)
        if not keeps_usage_event(payload, self._record, self._usage_asked):
            return b""
        return self._rewrite(payload)


def forward(path: str, body: dict, *, error_event: ErrorEvent, rewrite_event: EventRewriter | None = None,
            rewrite_json: Callable[[dict], dict] | None = None) -> Response:
    """Sends a checked body to vLLM (model and token budget fitted) and relays the answer."""
    upstream = current_app.extensions["dce_upstream"]
    fit_to_model(body, upstream.models())
    record = current_record()
    slot = record.slot
    if body.get("stream"):
        usage_asked = ask_for_usage(body)
        relay = (Passthrough(error_event, record, usage_asked) if rewrite_event is None
                 else Rewriter(rewrite_event, error_event, record, usage_asked))
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
    return Response(_rest_of(answer, first, chunks, current_record(), int(length) if length else None),
                    mimetype="application/json", headers={"Content-Length": length} if length else None)


def _rest_of(answer: urllib3.BaseHTTPResponse, first: bytes, chunks: Iterator[bytes], record: RequestRecord,
             length: int | None) -> Iterator[bytes]:
    """The answer's bytes; the usage at its end (vLLM's last fields) goes to the request's record.
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
                count_usage_at_end(tail, record)
            yield chunk
        if length is None:
            whole = True
            count_usage_at_end(tail, record)
    finally:
        # A connection read to its end goes back to the pool; one cut (or left by the client) does not.
        if whole:
            answer.release_conn()
        else:
            answer.close()




def _end_of_last_event(data: bytes) -> int:
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _whole_events(events: bytes) -> list[bytes]:
    """Whole events cut apart, each with its own blank line."""
    cut, start = [], 0
    for end in _EVENT_END.finditer(events):
        cut.append(events[start:end.end()])
        start = end.end()
    return cut
