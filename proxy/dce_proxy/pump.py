"""Reads one streamed vLLM answer in a thread of its own (a greenlet under gunicorn's gevent worker)
and hands over what happens as items, so that the response can send heartbeats while vLLM is silent.

Items, in order: OPENED (vLLM answered 200 with an event stream), then the body as bytes, then
ENDED; or, at any point, one Failed (an ApiError) or, instead of OPENED, one Refused (vLLM's own
error answer). Nothing follows a Failed, a Refused or ENDED. The chunks read since the last get are
handed over joined: a response that fell behind (busy cores, thousands of streams) catches up with
one write instead of one per event, and as many fewer switches between the two.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import Mapping
from dataclasses import dataclass

import urllib3

from .errors import ApiError, upstream_garbage, upstream_unavailable
from .upstream import Upstream, UpstreamStreamError, iter_body, read_all

log = logging.getLogger("dce_proxy")

OPENED = "opened"
ENDED = "ended"
# Chunks read ahead of the client. Bounded, so that a client that reads slowly slows the reading of
# vLLM (TCP backpressure, as without a pump), and so that a pump whose reads never wait (vLLM
# faster than this worker) still lets the gevent loop run its other streams at least this often:
# without it, one stream held a worker until gunicorn missed its 60-s heartbeat and killed it.
_READ_AHEAD = 32


@dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclass(frozen=True)
class Refused:
    """vLLM answered with an error status; its body is passed on (or turned into an error event)."""
    status: int
    body: bytes


class Pump:
    def __init__(self, upstream: Upstream, path: str, body: bytes, headers: Mapping[str, str]):
        self._upstream = upstream
        self._items: collections.deque = collections.deque()
        self._changed = threading.Condition()  # an item put, or taken
        self._answer: urllib3.BaseHTTPResponse | None = None
        self._closed = False
        threading.Thread(target=self._run, args=(path, body, headers), name="dce-upstream", daemon=True).start()

    def get(self, timeout: float):
        """The next item, chunks that came in a row joined into one; queue.Empty if none came within
        `timeout` seconds."""
        with self._changed:
            if not self._items and not self._changed.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            item = self._items.popleft()
            if isinstance(item, bytes) and self._items and isinstance(self._items[0], bytes):
                chunks = [item]
                while self._items and isinstance(self._items[0], bytes):
                    chunks.append(self._items.popleft())
                item = b"".join(chunks)
            self._changed.notify()  # room for a pump that waits for it
            return item

    def _put(self, item) -> None:
        """Waits while the client is _READ_AHEAD chunks behind; drops the item once closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or len(self._items) < _READ_AHEAD)
            if not self._closed:
                self._items.append(item)
                self._changed.notify()

    def close(self) -> None:
        """Stops reading; the pump then closes vLLM's stream, which makes vLLM abort the generation.
        (Only the pump's own thread may close it: its read may be under way.)"""
        self._closed = True
        answer = self._answer
        if answer is not None:
            try:
                answer.shutdown()  # ends the pump's read at once, even in a real thread
            except (ValueError, RuntimeError, OSError):
                pass  # nothing to end: the answer was read to its end
        with self._changed:  # a pump waiting to hand over a chunk nobody will take: it sees it is closed
            self._items.clear()
            self._changed.notify_all()

    def _run(self, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            self._put(self._pump(path, body, headers))
        except Exception:  # a pump that dies silently would leave its client heart-beating forever
            if not self._closed:  # a read cut by close() is the normal end of an abandoned stream
                log.exception("reading vLLM's stream failed")
                self._put(Failed(upstream_unavailable("Reading vLLM's stream failed.")))
        finally:
            if self._answer is not None:
                self._answer.close()  # a no-op for an answer read to its end (its connection is pooled)

    def _pump(self, path: str, body: bytes, headers: Mapping[str, str]):
        """Puts OPENED and the body chunks; returns the last item."""
        try:
            answer = self._upstream.request("POST", path, body=body, stream=True, headers=headers)
        except ApiError as error:
            return Failed(error)
        self._answer = answer
        if self._closed:  # closed while vLLM was still to answer
            return ENDED
        if answer.status >= 400:
            try:
                return Refused(answer.status, read_all(answer))
            except ApiError as error:
                return Failed(error)
        if not answer.headers.get("Content-Type", "").startswith("text/event-stream"):
            return Failed(upstream_garbage("vLLM answered a streaming request without an event stream."))
        self._put(OPENED)
        try:
            for chunk in iter_body(answer):
                if self._closed:
                    return ENDED
                self._put(chunk)
        except UpstreamStreamError as exc:
            return Failed(exc.error)
        return ENDED
