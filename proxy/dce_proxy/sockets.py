"""Whether a socket has something to read (bytes or its end): right now, or within a time.

For right now, the system's poll(), not gevent's: gevent replaces select.poll with an emulation
that sets up a watcher per call (urllib3 asks before each reuse of a pooled connection to vLLM),
and gevent's select() passes to the system's, which refuses a descriptor above 1,023, as a worker
holding 500 streams has (ValueError). A poll with a zero timeout never blocks, so the system's is
safe in a greenlet. Within a time, a worker's socket (gevent's) is waited for in gevent's loop; the
system's poll, which blocks its thread, only ever waits for a thread's own socket.
"""

from __future__ import annotations

import select
import socket

import gevent.socket
from gevent.monkey import get_original

_system_poll = get_original("select", "poll")


def readable_now(sock: socket.socket) -> bool:
    poller = _system_poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def readable_within(sock: socket.socket, seconds: float) -> bool:
    """Waits at most `seconds` for it. A worker's socket (gevent's) is waited for as its reads wait:
    its watcher switches back to this greenlet as soon as the loop sees it readable. (gevent's poll
    emulation wakes it through a callback, which a loop busy with a thousand streams ran up to a
    second later.) Any other socket, in a thread: the system's poll."""
    seconds = max(seconds, 0.0)
    if isinstance(sock, gevent.socket.socket):
        try:
            gevent.socket.wait_read(sock.fileno(), timeout=seconds)
        except socket.timeout:
            return False
        return True
    poller = _system_poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))
