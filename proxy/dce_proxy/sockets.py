"""Whether a socket has something to read (bytes or its end) right now, without waiting.

The system's poll(), not gevent's: gevent replaces select.poll with an emulation that sets up a
watcher per call (urllib3 asks before each reuse of a pooled connection to vLLM), and gevent's
select() passes to the system's, which refuses a descriptor above 1,023, as a worker holding 500
streams has (ValueError). A poll with a zero timeout never blocks, so the system's is safe in a
greenlet.
"""

from __future__ import annotations

import select
import socket

from gevent.monkey import get_original

_system_poll = get_original("select", "poll")


def readable_now(sock: socket.socket) -> bool:
    poller = _system_poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
