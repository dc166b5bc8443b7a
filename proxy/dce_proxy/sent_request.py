"""A streamed request to vLLM, sent by the request that relays it, its answer read once it came.

The response waits for vLLM's answer itself, on the connection's socket, sending its client
heartbeats meanwhile. A thread of its own per stream used to send the request and read the
answer: in a worker relaying a thousand streams, starting that thread, waiting for it to start and
being woken by it were three waits for a turn of gevent's callbacks (which it runs for at most 5 ms
per turn of its loop), most of a first token's time in a burst of streams.

It uses urllib3's pool below urlopen: _get_conn and _put_conn, and the two fields by
which an answer's release_conn() gives its connection back (as HTTPConnectionPool._make_request
sets them). urllib3 is pinned; the unit tests run every path here.
"""

from __future__ import annotations

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
STALE_CONNECTION = (RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_NOT_ACCEPTED = "vLLM did not accept the connection: it is starting (loading the model), restarting, or down."
_NOT_REACHABLE = "vLLM is not reachable (starting, restarting or down)."
_NO_ANSWER = "vLLM did not start answering in time."


class SentRequest:
    def __init__(self, pool: urllib3.HTTPConnectionPool, target: str, body: bytes, headers: Mapping[str, str],
                 timeout: urllib3.Timeout, not_there: Callable[[str], ApiError]):
        self._pool, self._target, self._body, self._headers = pool, target, body, headers
        self._timeout = timeout
        self._not_there = not_there  # the 503 for a vLLM that did not answer, with this reason
        self._resent = False
        self._connection: HTTPConnection | None = self._send(pool._get_conn())

    def answered_within(self, seconds: float) -> bool:
        """Whether vLLM's answer (or the end of its connection) came within `seconds`. Raises
        ApiError (504) once vLLM took longer than the read timeout to start answering."""
        if readable_within(self._connection.sock, min(seconds, self._answer_by - time.monotonic())):
            return True
        if time.monotonic() >= self._answer_by:
            self.close()
            raise upstream_timeout(_NO_ANSWER)
        return False

    def answer(self) -> urllib3.BaseHTTPResponse | None:
        """vLLM's answer, its headers read (call it once answered_within says so); None when the
        request had to be sent once more, on a new connection, to be waited for again: vLLM had
        closed the pooled one without any answer, so it never handled the request, and even a POST
        is safe to resend. Once only: a second silent close is vLLM failing. Raises ApiError."""
        connection = self._connection
        connection.timeout = self._timeout.read_timeout
        try:
            answer = connection.getresponse()
        except STALE_CONNECTION:
            self.close()
            if self._resent:
                raise self._not_there(_NOT_REACHABLE) from None
            self._resent = True
            self._connection = self._send(self._pool._get_conn())
            return None
        except TimeoutError:
            self.close()
            raise upstream_timeout(_NO_ANSWER) from None
        except (OSError, HTTPException):
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

    def _send(self, connection: HTTPConnection) -> HTTPConnection:
        connection.timeout = self._timeout.connect_timeout
        self._connection = connection
        self._answer_by = time.monotonic() + self._timeout.read_timeout
        try:
            connection.request("POST", self._target, body=self._body, headers=self._headers,
                               preload_content=False)
        except (BrokenPipeError, ConnectionResetError):
            pass  # (as urllib3) a connection vLLM closed: reading its answer tells what happened
        except ConnectTimeoutError:  # also a refused connection, and a name that does not resolve yet
            self.close()
            raise self._not_there(_NOT_ACCEPTED) from None
        except (OSError, HTTPError):
            self.close()
            raise self._not_there(_NOT_REACHABLE) from None
        return connection
