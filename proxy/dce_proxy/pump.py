"""Reads one streamed vLLM answer in a thread of its own (a greenlet under gunicorn's gevent worker)
and hands over what happens as items, so that the response can send heartbeats while vLLM is silent.

Items, in order: OPENED (vLLM answered 200 with an event stream), then each body chunk as bytes, then
ENDED; or, at any point, one Failed (an ApiError) or, instead of OPENED, one Refused (vLLM's own
error answer). Nothing follows a Failed, a Refused or ENDED.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import urllib3

from .errors import ApiError, upstream_garbage, upstream_unavailable
from .upstream import Upstream, UpstreamStreamError, iter_body, read_all

log = logging.getLogger("dce_proxy")

OPENED = "opened"
ENDED = "ended"
# Chunks read ahead of the client. Bounded, so that a client that reads slowly slows the reading of
# vLLM (TCP backpressure, as without a pump), and so that the response and the pump take turns:
# with an unbounded backlog one stream's response could send thousands of chunks without ever
# letting the gevent loop run (measured: a worker missed gunicorn's 60-s heartbeat and was killed).
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
    def __init__(self, upstream: Upstream, path: str, body: bytes):
        self._upstream = upstream
        self._items: queue.Queue = queue.Queue(maxsize=_READ_AHEAD)
        self._answer: urllib3.BaseHTTPResponse | None = None
        self._closed = False
        threading.Thread(target=self._run, args=(path, body), name="dce-upstream", daemon=True).start()

    def get(self, timeout: float):
        """The next item; queue.Empty if none came within `timeout` seconds."""
        return self._items.get(timeout=timeout)

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
        # Room for a pump waiting to hand over a chunk nobody will take: it then sees it is closed.
        while True:
            try:
                self._items.get_nowait()
            except queue.Empty:
                break

    def _run(self, path: str, body: bytes) -> None:
        try:
            last = self._pump(path, body)
            if not self._closed:  # nobody takes items any more: a put could wait forever
                self._items.put(last)
        except Exception:  # a pump that dies silently would leave its client heart-beating forever
            if not self._closed:  # a read cut by close() is the normal end of an abandoned stream
                log.exception("reading vLLM's stream failed")
                self._items.put(Failed(upstream_unavailable("Reading vLLM's stream failed.")))
        finally:
            if self._answer is not None:
                self._answer.close()  # a no-op for an answer read to its end (its connection is pooled)

    def _pump(self, path: str, body: bytes):
        """Puts OPENED and the body chunks; returns the last item."""
        try:
            answer = self._upstream.request("POST", path, body=body, stream=True)
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
        self._items.put(OPENED)
        try:
            for chunk in iter_body(answer):
                if self._closed:
                    return ENDED
                self._items.put(chunk)  # waits while the client is _READ_AHEAD chunks behind
        except UpstreamStreamError as exc:
            return Failed(exc.error)
        return ENDED
