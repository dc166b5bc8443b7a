"""One request to vLLM on a pooled connection: sent at once, its answer read when the caller is ready.

A stream's response waits for vLLM's answer itself, on the connection's socket, sending its client
heartbeats meanwhile. A thread of its own per stream used to send the request and read the
answer: in a worker relaying a thousand streams, starting that thread, waiting for it to start and
being woken by it were three waits for a turn of gevent's callbacks (which it runs for at most 5 ms
per turn of its loop), most of a first token's time in a burst of streams. Every other request
(whole answers, the model list) reads its answer at once, through the same code.

It uses urllib3's pool below urlopen: _get_conn and _put_conn, and the two fields by which an
answer's release_conn() gives its connection back (as HTTPConnectionPool._make_request sets them).
urllib3 is pinned; the unit tests run every path here.
"""

from __future__ import annotations

import socket
import time
from http.client import HTTPException, RemoteDisconnected
from typing import Callable, Mapping

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, HTTPError

from .errors import ApiError, upstream_timeout, upstream_unavailable
from .sockets import readable_within

# What a pooled keep-alive connection that vLLM had already closed looks like when reused (vLLM's
# server drops connections idle for 5 s): the request got no answer at all.
_STALE_CONNECTION = (RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_NOT_ACCEPTED = "vLLM did not accept the connection: it is starting (loading the model), restarting, or down."
_NOT_REACHABLE = "vLLM is not reachable (starting, restarting or down)."
_NO_ANSWER = "vLLM did not start answering in time."


class SentRequest:
    def __init__(self, pool: urllib3.HTTPConnectionPool, method: str, target: str, body: bytes | None,
                 headers: Mapping[str, str], timeout: urllib3.Timeout, not_there: Callable[[str], ApiError]):
        self._pool, self._method, self._target, self._body, self._headers = pool, method, target, body, headers
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
        sends them as soon as it accepted the request, before any token)."""
        if self.socket is None or readable_within(self.socket, min(seconds, self._answer_by - time.monotonic())):
            return True  # (no socket: the send broke it; answer() tells what happened)
        if time.monotonic() >= self._answer_by:
            self.close()
            raise upstream_timeout(_NO_ANSWER)
        return False

    def answer(self) -> urllib3.BaseHTTPResponse | None:
        """vLLM's answer, its headers read (after answered_within said so, or waiting up to the
        read timeout); None when the request had to be sent once more, on a new connection, to be
        waited for again: vLLM had closed the pooled one without any answer, so it never handled
        the request, and even a POST is safe to resend. Once only: a second silent close is vLLM
        failing. Raises ApiError. The answer's socket stays `socket` (http.client lets go of it
        when vLLM says it will close the connection)."""
        connection = self._connection
        connection.timeout = self._timeout.read_timeout
        try:
            answer = connection.getresponse()
        except _STALE_CONNECTION:
            self.close()
            if self._resent:
                raise self._not_there(_NOT_REACHABLE) from None
            self._resent = True
            self._send()
            return None
        except TimeoutError as error:
            self.close()
            if error.errno:  # the kernel's ETIMEDOUT: vLLM's host stopped answering TCP keep-alive
                raise self._not_there(_NOT_REACHABLE) from None
            raise upstream_timeout(_NO_ANSWER) from None
        except (OSError, HTTPException, HTTPError):  # (HTTPError: urllib3's, e.g. headers it refuses)
            self.close()
            raise self._not_there(_NOT_REACHABLE) from None
        self._connection = None  # the answer's now: its release_conn() or close() ends it
        answer._connection, answer._pool = connection, self._pool
        if answer.status in (502, 503, 504):
            answer.close()
            raise upstream_unavailable(f"vLLM is not ready (HTTP {answer.status}).")
        return answer

    def close(self) -> None:
        """Its answer will not be read: the connection closes (vLLM aborts what it started)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
            self._pool._put_conn(None)  # the pool's count of connections, as urlopen keeps it

    def _send(self) -> None:
        connection = self._connection = self._pool._get_conn()
        connection.timeout = self._timeout.connect_timeout
        try:
            connection.request(self._method, self._target, body=self._body, headers=self._headers,
                               preload_content=False)
        except (BrokenPipeError, ConnectionResetError):
            pass  # (as urllib3) a connection vLLM closed: reading its answer tells what happened
        except ConnectTimeoutError:  # also a refused connection, and a name that does not resolve yet
            self.close()
            raise self._not_there(_NOT_ACCEPTED) from None
        except (OSError, HTTPError):
            self.close()
            raise self._not_there(_NOT_REACHABLE) from None
        self.socket: socket.socket | None = connection.sock
        self._answer_by = time.monotonic() + self._timeout.read_timeout
