"""One request to vLLM on a pooled connection: sent at once, its answer read when the caller is ready.

A stream's response waits for vLLM's answer itself, on the connection's socket, sending its client
heartbeats meanwhile. A thread of its own per stream used to send the request and read the
answer: in a worker relaying a thousand streams, starting that thread, waiting for it to start and
being woken by it were three waits for a turn of gevent's callbacks (which it runs for at most 5 ms
per turn of its loop), most of a first token's time in a burst of streams. Every other request
(whole answers, the model list) reads its answer at once, through the same code.

The request goes out in one write, its answer is parsed by answer.py. urllib3 keeps the pool of
connections (and connects them, over TLS too): its _get_conn and _put_conn, as urlopen uses them.
urllib3 is pinned; the unit tests run every path here.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, HTTPError

from .answer import READ_BYTES, Answer, AnswerParser, NotHttp
from .errors import ApiError, upstream_timeout, upstream_unavailable
from .sockets import readable_within

# What a pooled keep-alive connection that vLLM had already closed looks like when reused (vLLM's
# server drops connections idle for 5 s): the request got no answer at all.
_STALE_CONNECTION = (ConnectionResetError, BrokenPipeError)
_NOT_ACCEPTED = "vLLM did not accept the connection: it is starting (loading the model), restarting, or down."
_NOT_REACHABLE = "vLLM is not reachable (starting, restarting or down)."
_NO_ANSWER = "vLLM did not start answering in time."


class _NoAnswer(Exception):
    """vLLM closed the connection without a byte of answer."""


class SentRequest:
    def __init__(self, pool: urllib3.HTTPConnectionPool, request: bytes, timeout: urllib3.Timeout,
                 not_there: Callable[[str], ApiError]):
        self._pool, self._request = pool, request
        self._timeout = timeout
        self._not_there = not_there  # the 503 for a vLLM that did not answer, with this reason
        self._resent = False
        self._connection: HTTPConnection | None = None
        self._send()

    def answered_within(self, seconds: float) -> bool:
        """Whether vLLM's answer (or the end of its connection) came within `seconds`. Raises
        ApiError (504) once vLLM took longer than the read timeout to start answering.

        Over TLS the session tickets a TLS 1.3 server sends after the handshake make a new
        connection readable too: answer() then waits for vLLM's headers without heartbeats (vLLM
        sends them as soon as it accepted the request, before any token), and so does an interim
        answer (100 Continue, which vLLM sends only to a request that asks for it)."""
        if readable_within(self.socket, min(seconds, self._answer_by - time.monotonic())):
            return True
        if time.monotonic() >= self._answer_by:
            self.close()
            raise upstream_timeout(_NO_ANSWER)
        return False

    def answer(self) -> Answer | None:
        """vLLM's answer, its head read (after answered_within said so, or waiting up to the read
        timeout); None when the request had to be sent once more, on a new connection, to be waited
        for again: vLLM had closed the pooled one without any answer, so it never handled the
        request, and even a POST is safe to resend. Once only: a second silent close is vLLM
        failing. Raises ApiError."""
        parsed = AnswerParser()
        try:
            early = self._read_head(parsed)
        except (_NoAnswer, *_STALE_CONNECTION):
            self.close()
            if parsed.received or self._resent:  # (vLLM had begun answering, or this was the resend)
                raise self._not_there(_NOT_REACHABLE) from None
            self._resent = True
            self._send()
            return None
        except TimeoutError as error:
            self.close()
            if error.errno:  # the kernel's ETIMEDOUT: vLLM's host stopped answering TCP keep-alive
                raise self._not_there(_NOT_REACHABLE) from None
            raise upstream_timeout(_NO_ANSWER) from None
        except (OSError, ValueError, NotHttp):  # (ValueError: a TLS socket closed under the read)
            self.close()
            raise self._not_there(_NOT_REACHABLE) from None
        connection, self._connection = self._connection, None  # the answer's now
        answer = Answer(parsed, early, self.socket, self._timeout.read_timeout,
                        release=lambda: self._pool._put_conn(connection),
                        close=lambda: self._drop(connection))
        if answer.status in (502, 503, 504):
            answer.close()
            raise upstream_unavailable(f"vLLM is not ready (HTTP {answer.status}).")
        return answer

    def close(self) -> None:
        """Its answer will not be read: the connection closes (vLLM aborts what it started)."""
        if self._connection is not None:
            self._drop(self._connection)
            self._connection = None

    def _drop(self, connection: HTTPConnection) -> None:
        connection.close()
        self._pool._put_conn(None)  # the pool's count of connections, as urlopen keeps it

    def _read_head(self, parsed: AnswerParser) -> bytes:
        """Reads until the answer's head is whole; returns the body bytes that came with it."""
        self.socket.settimeout(self._timeout.read_timeout)
        early = []
        while not parsed.head_done:
            data = self.socket.recv(READ_BYTES)
            if not data:
                raise _NoAnswer
            early.append(parsed.feed(data))
        return b"".join(early)

    def _send(self) -> None:
        connection = self._connection = self._pool._get_conn()
        try:
            if connection.sock is None:
                connection.timeout = self._timeout.connect_timeout
                connection.connect()
            connection.sock.settimeout(self._timeout.connect_timeout)
            connection.sock.sendall(self._request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # (as urllib3) a connection vLLM closed: reading its answer tells what happened
        except ConnectTimeoutError:  # also a refused connection, and a name that does not resolve yet
            self.close()
            raise self._not_there(_NOT_ACCEPTED) from None
        except (OSError, HTTPError):
            self.close()
            raise self._not_there(_NOT_REACHABLE) from None
        self.socket: socket.socket = connection.sock
        self._answer_by = time.monotonic() + self._timeout.read_timeout
