"""vLLM's answer to one request, read straight from its connection's socket: its status and headers,
then its body as it arrives, each read taking everything that came and waiting for bytes no longer
than its caller says (a stream's next heartbeat).

httptools parses it: llhttp, Node.js's HTTP parser, which uvicorn uses too; its C code undoes the
chunked coding of an event stream. http.client and urllib3 spent about 260 µs of CPU on a JSON
request to vLLM and its answer (email's header parser, their wrappers of the socket and the
answer), 40 µs sent and parsed this way: the most of any one part of the proxy's work per request.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

import httptools

from .errors import ApiError, upstream_garbage, upstream_timeout, upstream_unavailable

# At most this much per read: what a stream's relay then writes to its client at once.
READ_BYTES = 16384
# Reads in a row that find bytes at once let the worker's other greenlets run this often: a stream
# vLLM sends faster than the worker relays never waits on its socket, and one such stream held a
# worker until gunicorn missed its 60-s heartbeat and killed it.
_READS_BETWEEN_TURNS = 32
# No answer of vLLM's has a head this long: more bytes without its end are not vLLM answering.
_MAX_HEAD_BYTES = 65536
# How a body that stopped before its end is told, whoever reads it.
SILENT = "vLLM stopped sending tokens (timed out)."
CUT = "vLLM closed the stream before it ended."


class UpstreamStreamError(Exception):
    """vLLM's body broke after its head came (and the client may already have its 200)."""

    def __init__(self, error: ApiError):
        super().__init__(error.message)
        self.error = error


class NotHttp(Exception):
    """The bytes are not an HTTP/1.1 answer."""


class AnswerParser:
    """Feed it the answer's bytes as they arrive; it returns the body bytes they complete. The head
    is known once `head_done`; `complete` once the body ended as its head said it would. Bytes after
    the end (`surplus`) make the connection unsafe to reuse. A broken head raises NotHttp; a body
    broken after a good head is `broken` (what is wrong), for its reader to tell."""

    def __init__(self):
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}  # names in lower case
        self.head_done = False
        self.complete = False
        self.keeps_connection = False  # vLLM keeps the connection open after it (HTTP/1.1, no Connection: close)
        self.surplus = False
        self.broken: str | None = None
        self.received = 0  # bytes fed, head and body
        self._messages = 0
        self._pieces: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self.received += len(data)
        if self.complete or self.broken:
            self.surplus = self.surplus or bool(data)
            return b""
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            problem = str(error) or type(error).__name__
            if not self.head_done:
                raise NotHttp(problem) from None
            if self.complete:
                self.surplus = True  # (what followed the answer is not even HTTP)
            else:
                self.broken = problem
        if not self.head_done and self.received > _MAX_HEAD_BYTES:
            raise NotHttp("the answer's head is too long")
        pieces, self._pieces = self._pieces, []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def ends_at_close(self) -> bool:
        """A body framed by neither Content-Length nor chunked coding: it ends when vLLM closes."""
        codings = self.headers.get("transfer-encoding", "").lower()
        chunked = codings.rsplit(",", 1)[-1].strip() == "chunked"
        return "content-length" not in self.headers and not chunked and self.status not in (204, 304)

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self._messages += 1
        self.surplus = self._messages > 1

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._messages == 1 and not self.head_done:  # (not a chunked body's trailer fields)
            key, text = name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        if self._messages == 1:
            self.status = self._parser.get_status_code()
            self.head_done = not self._interim

    def on_body(self, body: bytes) -> None:
        if self._messages == 1 and not self._interim:  # (an interim answer may have a body of its own)
            self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self._messages != 1:
            return
        if self._interim:  # (100 Continue, 103 Early Hints: the answer follows on the same connection)
            self._messages, self.status, self.headers = 0, 0, {}
            return
        self.complete = True
        self.keeps_connection = self._parser.should_keep_alive()  # (llhttp forgets it right after)

    @property
    def _interim(self) -> bool:
        return 100 <= self.status < 200 and self.status != 101


class Answer:
    """vLLM's answer, its head read: `status`, `headers` (names in lower case), and its body by
    `read`. The connection goes back to the pool once the body was read whole (`release`), and
    closes otherwise (`close`), which makes vLLM abort what it generates."""

    def __init__(self, parsed: AnswerParser, early: bytes, sock: socket.socket, silence_limit: float,
                 release: Callable[[], None], close: Callable[[], None]):
        self._parsed = parsed
        self.status = parsed.status
        self.headers = parsed.headers
        self._early = early  # body bytes that came with the head
        self._sock = sock
        self.silence_limit = silence_limit  # the longest vLLM may stay silent
        self._silent_for = 0.0  # seconds waited for vLLM's bytes since the last came
        self._release, self._close = release, close
        self._ends_at_close = parsed.ends_at_close
        self._reads_in_a_row = 0
        self._ended = False  # the connection went back to the pool, or closed
        self._whole = False  # the body's end came
        if parsed.complete:  # all of it came with the head, or there is none
            self._finish()

    @property
    def done(self) -> bool:
        """The whole body was read: nothing more comes."""
        return self._whole and not self._early

    def read(self, wait: float) -> bytes | None:
        """The body bytes that arrived within `wait` seconds (b"" when they were only framing), or
        None when none did. After `done`, nothing more comes. Raises UpstreamStreamError."""
        if self._early:
            data, self._early = self._early, b""
            return data
        self._raise_if_broken()
        if self.done:
            return b""
        # Silence counts only while waiting here: time spent writing to a slow client is not vLLM's.
        limit = min(wait, self.silence_limit - self._silent_for)
        self._sock.settimeout(max(limit, 0.0))
        waited_from = time.monotonic()
        try:
            data = self._sock.recv(READ_BYTES)
        except TimeoutError as error:
            if error.errno:  # the kernel's ETIMEDOUT: vLLM's host stopped answering TCP keep-alive
                raise self._broken(upstream_unavailable(CUT)) from None
            self._silent_for += time.monotonic() - waited_from
            if self._silent_for >= self.silence_limit:
                raise self._broken(upstream_timeout(SILENT)) from None
            self._reads_in_a_row = 0
            return None
        except (OSError, ValueError):  # (ValueError: a TLS socket closed under the read)
            raise self._broken(upstream_unavailable(CUT)) from None
        if not data:
            if not self._ends_at_close:
                raise self._broken(upstream_unavailable(CUT))
            self._finish(reuse=False)
            return b""
        self._reads_in_a_row += 1
        if self._reads_in_a_row >= _READS_BETWEEN_TURNS:
            self._reads_in_a_row = 0
            time.sleep(0)  # (gevent's sleep in a worker: a turn for the others)
        self._silent_for = 0.0
        body = self._parsed.feed(data)
        self._raise_if_broken()
        if self._parsed.complete:
            self._finish()
        return body

    def read_end(self, wait: float) -> None:
        """Reads the end of a body whose last event went out: vLLM's server writes it right after,
        and a connection read to its end goes back to the pool, where one closed costs the next
        stream a new connection. Anything else, or nothing within `wait`: the connection closes."""
        try:
            while not self.done and self.read(wait) == b"":
                pass
        except UpstreamStreamError:
            pass
        self.close()

    def close(self) -> None:
        """Closes vLLM's connection unless the body was read whole (and it went back to the pool)."""
        if not self._ended:
            self._ended = True
            self._close()

    def _finish(self, reuse: bool = True) -> None:
        self._whole = True
        if not self._ended:
            self._ended = True
            if reuse and self._parsed.keeps_connection and not self._parsed.surplus:
                self._release()
            else:
                self._close()

    def _raise_if_broken(self) -> None:
        if self._parsed.broken:
            raise self._broken(upstream_garbage(f"vLLM's answer is not valid HTTP: {self._parsed.broken}."))

    def _broken(self, error: ApiError) -> UpstreamStreamError:
        self.close()
        return UpstreamStreamError(error)
