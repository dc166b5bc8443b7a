"""Turning vLLM's answer into the client's: JSON bodies, and the two ways to relay an event stream
(bytes passed through untouched, or each event rewritten)."""

from __future__ import annotations

import itertools
import json
from typing import Callable, Iterator

from flask import Response

from .affinity import SESSION_HEADER, session_id
from .answer import Answer, UpstreamStreamError
from .config import settings
from .errors import (ApiError, from_upstream, json_response, upstream_error_answer, upstream_garbage,
                     upstream_unavailable)
from .record import RequestRecord, current_record
from .sse import DONE, EventSplitter, LineMatch, event_data, event_json, has_done, split_whole
from .response_events import ResponseEventsRelay
from .stream import Relay, stream_response
from .upstream import iter_body, read_all, upstream
from .usage import (USAGE_KEY, UsageAsked, as_asked, as_asked_bytes, ask_for_usage, count_text_events,
                    count_usage_at_end)

# Per-event rewrite: takes the decoded event, returns the bytes to send (b"" to send nothing).
EventRewriter = Callable[[dict], bytes]
# The same rewrite made on an event's data bytes, for the events it can do so: None for the others.
BytesRewriter = Callable[[bytes], "bytes | None"]
# Builds the event that tells the client its stream failed (the relay adds DONE).
ErrorEvent = Callable[[ApiError], bytes]

_EARLY_END = "vLLM ended the stream before it was complete."
# Enough of a whole answer's end to hold its usage and the fields vLLM may put after it (e.g. the
# prompt's token ids when asked for).
_USAGE_TAIL_BYTES = 65536
# vLLM's error event in a stream, {"error": {...}}: a top-level key, which text cannot fake.
_VLLM_ERROR_EVENT = LineMatch(rb'(?:^|\n)data: ?\{\s*"error"\s*:', b'"error"')


def upstream_error_response(answer: Answer) -> Response:
    """vLLM's own error answer, passed through (errors.upstream_error_answer)."""
    try:
        body = read_all(answer)
    except ApiError:
        body = b""
    return upstream_error_answer(answer.status, body)


def read_json(answer: Answer) -> tuple[bytes, dict]:
    """vLLM's JSON answer: its bytes (to pass on untouched) and their parsed form."""
    body = read_all(answer)
    try:
        parsed = json.loads(body)
    except ValueError:
        raise upstream_garbage("vLLM's answer is not valid JSON.") from None
    if not isinstance(parsed, dict):
        raise upstream_garbage("vLLM's answer is not a JSON object.")
    usage = parsed.get("usage")
    if isinstance(usage, dict):
        current_record().take_usage(usage, final=True)
    return body, parsed


class _ChatEvents:
    """A chat or completions stream: it ends with [DONE], after an error event of the route's shape."""

    def __init__(self, error_event: ErrorEvent):
        self.error_event = error_event

    def ending(self, error: ApiError) -> bytes:
        return self.error_event(error) + DONE


class Passthrough(_ChatEvents):
    """vLLM's events go out byte for byte as it sent them, each as soon as it is complete. Only its
    usage event is read, and held back from a client that did not ask for it."""

    stopped = False  # it never ends a stream on its own
    at_boundary = True  # it only ever sends whole events

    def __init__(self, error_event: ErrorEvent, record: RequestRecord, usage_asked: UsageAsked):
        super().__init__(error_event)
        self.complete = False  # vLLM's [DONE] went out
        self.failed = False  # vLLM reported an error in the stream (and then sent [DONE])
        self._record = record
        self._usage_asked = usage_asked
        self._splitter = EventSplitter()

    def feed(self, chunk: bytes) -> bytes:
        events = self._splitter.whole(chunk)
        return self._relayed(events) if events else b""

    def end(self) -> bytes:
        # vLLM's last event without its blank line still goes out, ended, when it is whole: a cut
        # one would only break the client's parser before the error event that says why.
        out = b"".join(self._relayed(event + b"\n\n") for event in self._splitter.rest() if _whole(event))
        return out if self.complete else out + self.ending(upstream_unavailable(_EARLY_END))

    def _relayed(self, events: bytes) -> bytes:
        count_text_events(events, self._record)
        if USAGE_KEY.search(events):  # (only the events that hold it are decoded: reads coalesce)
            events = b"".join(self._usage_read(event) if USAGE_KEY.search(event) else event
                              for event in split_whole(events))
        self.failed = self.failed or _VLLM_ERROR_EVENT.found_in(events)
        self.complete = self.complete or has_done(events)
        return events

    def _usage_read(self, event: bytes) -> bytes:
        data = event_data(event)
        payload = event_json(data) if data is not None else None
        if payload is None or as_asked(payload, self._record, self._usage_asked) is not None:
            return event  # (the proxy asks for nothing here that a client did not: bytes unchanged)
        return b""


def _whole(event: bytes) -> bool:
    data = event_data(event)
    return data is not None and (data.strip() == b"[DONE]" or event_json(data) is not None)


class Rewriter(_ChatEvents):
    """Each upstream event is rewritten and sent on its own, as soon as it is complete. Events that
    `rewrite_bytes` can rewrite on their bytes are (vLLM's usage taken out there too, unless asked):
    only the others are decoded, so that a route costs little more than passing through."""

    at_boundary = True  # it only ever sends whole events

    def __init__(self, rewrite: EventRewriter, error_event: ErrorEvent, record: RequestRecord,
                 usage_asked: UsageAsked, rewrite_bytes: BytesRewriter | None = None):
        super().__init__(error_event)
        self.complete = False  # vLLM's [DONE] went out
        self.stopped = False  # the stream was ended here, on an error event
        self._rewrite = rewrite
        self._rewrite_bytes = rewrite_bytes
        self._record = record
        self._usage_asked = usage_asked
        self._splitter = EventSplitter()

    def feed(self, chunk: bytes) -> bytes:
        return self._events(self._splitter.feed(chunk))

    def end(self) -> bytes:
        # An event without its blank line may be cut: only decoding tells a whole one.
        out = self._events(self._splitter.rest(), whole=False)
        if self.complete or self.stopped:
            return out
        return out + self.ending(upstream_unavailable(_EARLY_END))

    def _events(self, events: list[bytes], whole: bool = True) -> bytes:
        out = []
        for event in events:
            if self.complete or self.stopped:
                break
            out.append(self._event(event, whole))
        return b"".join(out)

    def _event(self, event: bytes, whole: bool) -> bytes:
        if whole and self._rewrite_bytes is not None and event.startswith(b"data: {") and b"\n" not in event:
            rewritten = self._rewrite_bytes(event[6:])
            sent = None if rewritten is None else as_asked_bytes(rewritten, self._record, self._usage_asked)
            if sent is not None:
                count_text_events(event, self._record)
                return b"data: " + sent + b"\n\n"
        data = event_data(event)
        if data is None:
            return b""
        if data.strip() == b"[DONE]":
            self.complete = True
            return DONE
        payload = event_json(data)
        if payload is None:
            self.stopped = True
            return self.ending(upstream_garbage("vLLM sent an event that is not a JSON object."))
        if isinstance(payload.get("error"), dict):
            self.stopped = True
            return self.ending(from_upstream(payload["error"], 502))
        count_text_events(data, self._record)
        payload = as_asked(payload, self._record, self._usage_asked)
        return b"" if payload is None else self._rewrite(payload)

    @property
    def failed(self) -> bool:
        return self.stopped


def forward(path: str, body: dict, *, error_event: ErrorEvent, rewrite_event: EventRewriter | None = None,
            rewrite_event_bytes: BytesRewriter | None = None,
            rewrite_json: Callable[[dict], dict] | None = None) -> Response:
    """Sends a chat or completions body (request_body.generation_body) to vLLM and relays the
    answer: a stream's events passed through, or each rewritten by `rewrite_event`."""
    def chat_relay(record: RequestRecord) -> Relay:
        # A relay that rewrites each event can take vLLM's usage out of each again: it asks for it
        # in every event, so that a stream its client left still has vLLM's prompt count.
        usage_asked = ask_for_usage(body, in_every_event=rewrite_event is not None)
        if rewrite_event is None:
            return Passthrough(error_event, record, usage_asked)
        return Rewriter(rewrite_event, error_event, record, usage_asked, rewrite_event_bytes)

    return _forward(path, body, chat_relay, rewrite_json)


def forward_response(body: dict) -> Response:
    """/v1/responses: a generation body sent to vLLM, its answer or its event stream passed through."""
    return _forward("/v1/responses", body, ResponseEventsRelay, None)


def _forward(path: str, body: dict, make_relay: Callable[[RequestRecord], Relay],
             rewrite_json: Callable[[dict], dict] | None) -> Response:
    vllm = upstream()
    record = current_record()
    slot = record.slot
    headers = {SESSION_HEADER: session_id(record.key, body)} if settings().session_affinity \
        else {}
    if body.get("stream"):
        relay = make_relay(record)  # (before the body is written: a chat relay asks vLLM for its usage)
        return stream_response(vllm, path, json.dumps(body).encode(), headers, relay, slot)
    if not slot.held:
        raise slot.refusal()  # only a stream can wait in line: heartbeats keep its client
    answer = vllm.request("POST", path, body=json.dumps(body).encode(), timeout=vllm.whole_answer_timeout,
                          headers=headers)
    if answer.status >= 400:
        if answer.status == 404:
            vllm.forget_models()  # the served model may have changed under us
        return upstream_error_response(answer)
    if rewrite_json is None:
        return _passed_through(answer)
    _, parsed = read_json(answer)
    return json_response(rewrite_json(parsed))


def _passed_through(answer: Answer) -> Response:
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
    length = answer.headers.get("content-length")
    return Response(_rest_of(answer, first, chunks, current_record(), int(length) if length else None),
                    mimetype="application/json", headers={"Content-Length": length} if length else None)


def _rest_of(answer: Answer, first: bytes, chunks: Iterator[bytes], record: RequestRecord,
             length: int | None) -> Iterator[bytes]:
    """The answer's bytes; the usage at its end (vLLM's last fields) goes to the request's record.
    A cut (UpstreamStreamError) propagates: gunicorn then closes the client's connection at once,
    where a quiet end would leave the client waiting for the bytes its Content-Length promised."""
    tail, received = b"", 0
    try:
        for chunk in itertools.chain([first], chunks):
            received += len(chunk)
            tail = (tail + chunk)[-_USAGE_TAIL_BYTES:]
            # Counted before the last bytes go out: a client may stop reading once it has them all.
            if received == length:
                count_usage_at_end(tail, record)
            yield chunk
        if length is None:
            count_usage_at_end(tail, record)
    finally:
        answer.close()  # (one read whole is back in the pool already: this closes one cut, or left)
