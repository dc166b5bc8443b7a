"""The body of vLLM's event stream, read by the response that relays it, straight from its socket.

Each read takes everything that has arrived, its HTTP chunks joined (chunked.py), and waits for
bytes no longer than the caller's next heartbeat is due. With the reads in the response's own
greenlet, a stream costs one wake-up per turn of the worker's loop, driven by its socket; a reader
thread of its own handed every read over (a deque and a Condition), which cost a second switch and
a callback that gevent runs only for 5 ms per turn, so that with a thousand streams the writes to
the clients fell ever further behind the reads.
"""

from __future__ import annotations

import socket
import ssl
import time

import urllib3

from .chunked import ChunkedCodingError, ChunkedDecoder
from .errors import upstream_garbage, upstream_timeout, upstream_unavailable
from .upstream import CUT, SILENT, UpstreamStreamError

_READ_BYTES = 16384
# Reads in a row that find bytes at once let the worker's other greenlets run this often: a stream
# vLLM sends faster than the worker relays never waits on its socket, and one such stream held a
# worker until gunicorn missed its 60-s heartbeat and killed it.
_READS_BETWEEN_TURNS = 32


class _Unchunked:
    """A body without chunked coding: it ends after Content-Length bytes, or when vLLM closes."""

    def __init__(self, length: int | None):
        self._left = length
        self.done = length == 0
        self.surplus = b""

    def feed(self, data: bytes) -> bytes:
        if self._left is None:
            return data
        body, self.surplus = data[:self._left], data[self._left:]
        self._left -= len(body)
        self.done = not self._left
        return body


class StreamBody:
    """vLLM's answer (a 200 event stream, its headers read) from its first body byte on."""

    def __init__(self, answer: urllib3.BaseHTTPResponse, sock: socket.socket, silence_limit: float):
        self._answer = answer
        self._sock = sock  # (the connection's: http.client lets go of it when vLLM will close it)
        self._silence_limit = silence_limit
        self._silent_for = 0.0  # seconds waited for vLLM's bytes since the last came
        self._decoder = ChunkedDecoder() if answer.chunked else _Unchunked(answer.length_remaining)
        self._ends_at_close = not answer.chunked and answer.length_remaining is None
        self._reads_in_a_row = 0
        self._closed = False
        self.done = False  # the whole body was read
        self._early = self._buffered()
        if self._decoder.done:  # an empty body
            self._finish(reuse=True)

    def read(self, wait: float) -> bytes | None:
        """The body bytes that arrived within `wait` seconds (b"" when they were only framing), or
        None when none did. After `done`, nothing more comes. Raises UpstreamStreamError."""
        if self._early:
            data, self._early = self._early, b""
            return self._body_of(data)
        # Silence counts only while waiting here: time spent writing to a slow client is not vLLM's.
        limit = min(wait, self._silence_limit - self._silent_for)
        self._sock.settimeout(max(limit, 0.0))
        waited_from = time.monotonic()
        try:
            data = self._sock.recv(_READ_BYTES)
        except TimeoutError as error:
            if error.errno:  # the kernel's ETIMEDOUT: vLLM's host stopped answering TCP keep-alive
                raise UpstreamStreamError(upstream_unavailable(CUT)) from None
            self._silent_for += time.monotonic() - waited_from
            if self._silent_for >= self._silence_limit:
                raise UpstreamStreamError(upstream_timeout(SILENT)) from None
            self._reads_in_a_row = 0
            return None
        except (OSError, ValueError):  # (ValueError: a TLS socket closed under the read)
            raise UpstreamStreamError(upstream_unavailable(CUT)) from None
        if not data:
            if self._ends_at_close:
                self._finish(reuse=False)
                return b""
            raise UpstreamStreamError(upstream_unavailable(CUT))
        self._reads_in_a_row += 1
        if self._reads_in_a_row >= _READS_BETWEEN_TURNS:
            self._reads_in_a_row = 0
            time.sleep(0)  # (gevent's sleep in a worker: a turn for the others)
        return self._body_of(data)

    def read_end(self, wait: float) -> None:
        """Reads the end of a body whose last event went out: vLLM's server writes it right after,
        and a connection read to its end goes back to the pool, where one closed costs the next
        stream a new connection. Anything else, or nothing within `wait`: the connection closes."""
        try:
            while not self.done and self.read(wait) == b"":
                pass
        except UpstreamStreamError:
            pass
        if not self.done:
            self.close()

    def close(self) -> None:
        """Closes vLLM's connection unless the body was read whole: vLLM then aborts the generation."""
        if not self._closed:
            self._closed = True
            self._answer.close()

    def _body_of(self, data: bytes) -> bytes:
        self._silent_for = 0.0
        try:
            body = self._decoder.feed(data)
        except ChunkedCodingError as error:
            raise UpstreamStreamError(upstream_garbage(f"vLLM's stream is not valid HTTP: {error}.")) from None
        if self._decoder.done:
            self._finish(reuse=not self._decoder.surplus)
        return body

    def _buffered(self) -> bytes:
        """What http.client read past the headers into its buffered file of the socket (often the
        first events), taken without waiting: the reads after it go to the socket itself."""
        self._sock.settimeout(0)
        try:
            return self._answer._fp.fp.read1(65536)  # all it holds (< 65536), or at most one read
        except (ssl.SSLWantReadError, OSError):
            return b""  # (TLS's "nothing yet"; a plain socket's is an empty read; a broken one's
            # error comes again at the next read)

    def _finish(self, *, reuse: bool) -> None:
        self.done = True
        original = self._answer._original_response
        original.close()  # as urllib3 ends a body it read: http.client is done with it
        if reuse and not original.will_close:  # (vLLM said it closes this connection)
            self._answer.release_conn()
        else:
            self.close()
