"""A streamed answer: waiting in line for a slot and for vLLM with heartbeats, then vLLM's events
through a relay (relay.py), always ended as its kind of stream ends (DONE for a chat).

Whenever nothing went to the client for DCE_HEARTBEAT_SECONDS, it gets an SSE comment: clients like
the DCE extension kill a socket that stays silent for 60 s, while vLLM may be silent for longer
(prefill, a full engine, a stall). vLLM answering within one interval gets today's answers (its
errors with their status); later, the client already has its 200 and errors become stream events.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable, Iterator, Mapping, Protocol

import redis
from flask import Response, request

from .answer import Answer, UpstreamStreamError
from .config import settings
from .errors import (ApiError, limits_store_unavailable, too_many, upstream_error, upstream_error_answer,
                     upstream_unavailable)
from .limits import Slot
from .metrics import STREAMS_IN_FLIGHT, key_label
from .opener import Failed, Opened, Refused, StreamOpener
from .record import Outcome, RequestRecord, current_record
from .sockets import readable_now
from .sse import HEARTBEAT
from .upstream import Upstream

log = logging.getLogger("dce_proxy")

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How long the end of vLLM's body may take after its last event (it follows at once).
_BODY_END_SECONDS = 1.0
# How often a request in line looks for its slot and for its client having gone.
_POLL_SECONDS = 0.2


class Relay(Protocol):
    complete: bool  # vLLM's last event ([DONE], or a response's last) went out
    stopped: bool  # the relay ended the stream itself (with an error event)
    failed: bool  # the stream carried an error event (vLLM's, or the relay's own)
    at_boundary: bool  # between two events, where a heartbeat may go

    def ending(self, error: ApiError) -> bytes: ...  # ends a failed stream: the error, then the end
    def feed(self, chunk: bytes) -> bytes: ...
    def end(self) -> bytes: ...


def stream_response(upstream: Upstream, path: str, body: bytes, headers: Mapping[str, str], relay: Relay,
                    slot: Slot) -> Response:
    stream = _Stream(upstream, path, body, headers, relay, slot, _client_gone_probe(request.environ),
                     current_record())
    if slot.held:
        stream.start()
        early = stream.early_answer()
        if early is not None:
            return early
    response = Response(stream.body(), mimetype="text/event-stream", headers=_STREAM_HEADERS)
    # Closing the upstream socket is what makes vLLM abort the generation and free the GPU.
    response.call_on_close(stream.close)
    return response


def _client_gone_probe(environ: dict) -> Callable[[], bool]:
    """Tells, without writing to it, whether the client closed its connection (gunicorn's socket
    reads as EOF). Without that socket (the Flask test client) closing the response is the sign."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            return readable_now(sock) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    return gone


class _Stream:
    def __init__(self, upstream: Upstream, path: str, body: bytes, headers: Mapping[str, str], relay: Relay,
                 slot: Slot, client_gone: Callable[[], bool], record: RequestRecord):
        config = settings()
        self._upstream, self._path, self._body, self._headers = upstream, path, body, headers
        self._relay, self._slot, self._client_gone = relay, slot, client_gone
        self._record = record
        self._in_flight = STREAMS_IN_FLIGHT.labels(key_label(record.key))
        self._interval = config.heartbeat_seconds
        self._queue_timeout = config.queue_timeout
        self._cap = config.max_concurrent
        self._opener: StreamOpener | None = None
        self._next_beat = time.monotonic() + self._interval
        self._opened: Opened | None = None  # vLLM's stream, when early_answer saw it open

    def start(self) -> None:
        self._opener = StreamOpener(self._upstream, self._path, self._body, self._headers)
        self._in_flight.inc()

    def close(self) -> None:
        """The response closed: a stream that had not ended was left by its client."""
        self._record.end_stream(Outcome.CLIENT_GONE)
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        if self._opener is not None:
            self._opener.close()
            self._in_flight.dec()
            self._opener = None

    def early_answer(self) -> Response | None:
        """vLLM's answer when it came within one heartbeat interval and is not a stream (its error
        passed through, or ours raised); None when the stream goes on (or must start waiting)."""
        outcome = self._opener.outcome(timeout=self._interval)
        if outcome is None or isinstance(outcome, Opened):
            self._opened = outcome
            return None  # a stream, or vLLM is slow: the body waits on with heartbeats
        self._stop_upstream()
        if isinstance(outcome, Refused):
            self._forget_models_on_404(outcome.status)
            return upstream_error_answer(outcome.status, outcome.body)
        raise outcome.error

    def body(self) -> Iterator[bytes]:
        for piece in self._pieces():
            yield piece
            self._next_beat = time.monotonic() + self._interval  # resumed: the server sent the piece

    def _pieces(self) -> Iterator[bytes]:
        if self._opener is None:
            yield HEARTBEAT  # headers and a heartbeat at once: the client is in line, not lost
            if not (yield from self._wait_in_line()):
                return
            self.start()
        outcome = self._opened if self._opened is not None else (yield from self._outcome())
        if not isinstance(outcome, Opened):
            yield self._failed_with(self._error_of(outcome))
            return
        body = outcome.body
        while not body.done:
            try:
                data = yield from self._next_data(body)
            except UpstreamStreamError as exc:
                yield self._failed_with(exc.error)
                return
            except Exception:  # a stream that breaks here must still end with an error its client sees
                log.exception("reading vLLM's stream failed")
                yield self._failed_with(upstream_unavailable("Reading vLLM's stream failed."))
                return
            out = self._relay.feed(data) if data else b""
            if self._relay.stopped or self._relay.complete:
                self._ended(self._relay_outcome())
                yield out
                if self._relay.complete:
                    body.read_end(_BODY_END_SECONDS)
                return  # nothing may follow DONE, not even a heartbeat while vLLM closes
            if out:
                yield out
        last = self._relay.end()
        self._ended(self._relay_outcome())
        yield last

    def _relay_outcome(self) -> Outcome:
        return Outcome.DONE if self._relay.complete and not self._relay.failed else Outcome.UPSTREAM_ERROR

    def _ended(self, outcome: Outcome) -> None:
        """The stream's last bytes are about to go: its slot is freed first, so that a client that
        starts its next generation as soon as it has them finds the slot free."""
        self._record.end_stream(outcome)
        self._slot.free()

    def _failed(self, error: ApiError, outcome: Outcome) -> bytes:
        self._ended(outcome)
        return self._relay.ending(error)

    def _failed_with(self, error: ApiError) -> bytes:
        return self._failed(error, Outcome.TIMEOUT if error.status == 504 else Outcome.UPSTREAM_ERROR)

    def _outcome(self):
        """Waits for vLLM to answer, with heartbeats; returns how it did."""
        while True:
            outcome = self._opener.outcome(timeout=max(self._next_beat - time.monotonic(), 0.0))
            if outcome is not None:
                return outcome
            yield from self._beat()

    def _next_data(self, body: Answer):
        """Waits for vLLM's next bytes, with heartbeats; returns them."""
        while True:
            wait = self._next_beat - time.monotonic()
            if wait > 0:
                data = body.read(wait)
                if data is not None:
                    return data
            yield from self._beat()

    def _beat(self):
        if self._relay.at_boundary:
            yield HEARTBEAT  # (body() sets the next beat once the server sent it)
        else:  # never inside an event, which it would corrupt: look again an interval later
            self._next_beat = time.monotonic() + self._interval

    def _wait_in_line(self):
        """Waits for the slot, with heartbeats, until the queue timeout; False if it never came."""
        deadline = time.monotonic() + self._queue_timeout
        while True:
            now = time.monotonic()
            try:
                if self._slot.wait(max(min(_POLL_SECONDS, self._next_beat - now, deadline - now), 0.0)):
                    return True
            except redis.RedisError:  # the slots of several workers live in Redis
                yield self._failed(limits_store_unavailable(), Outcome.UPSTREAM_ERROR)
                return False
            if self._client_gone():
                return False  # closing the response takes this request out of the line
            now = time.monotonic()
            if now >= deadline:
                yield self._failed(too_many(f"No generation slot came free for this key within "
                                            f"{self._queue_timeout:g} s (limit {self._cap} at once). "
                                            "Try again later.", "queue_timeout", 1), Outcome.TIMEOUT)
                return False
            if now >= self._next_beat:
                yield HEARTBEAT

    def _error_of(self, item: Failed | Refused) -> ApiError:
        if isinstance(item, Failed):
            return item.error
        self._forget_models_on_404(item.status)
        return upstream_error(item.status, item.body)

    def _forget_models_on_404(self, status: int) -> None:
        if status == 404:
            self._upstream.forget_models()  # the served model may have changed under us

