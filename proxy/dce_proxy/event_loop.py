"""Two things done per stream that gevent's patched standard library makes costly, done the cheap
way: asking a socket whether a read would wait, and starting a task beside the request. At 1,000
streams started at once they took a fifth of the worker's time (py-spy, make bench): gevent emulates
poll() and select() with an event-loop watcher per call, and a patched Thread waits for its
greenlet to start."""

from __future__ import annotations

import select
import threading
from typing import Callable

import gevent
import urllib3
from gevent import monkey

# The system's poll(): asked with a zero timeout it never waits, so gevent has nothing to add.
# (Not select(): it refuses descriptors above 1023, and a worker holding 1,000 streams has them.)
_poll = monkey.get_original("select", "poll")


def readable_now(sock) -> bool:
    """Whether a read would not wait: data, end of file, or an error (a peer that closed)."""
    poller = _poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def start_beside(task: Callable[..., None], *args, name: str) -> None:
    """Runs `task` beside the request: a greenlet in a gevent worker, a thread elsewhere (the Flask
    test client serves on real threads)."""
    if monkey.is_module_patched("threading"):
        gevent.spawn(task, *args)
    else:
        threading.Thread(target=task, args=args, name=name, daemon=True).start()


class _DropCheckedBySelect:
    """Before a pooled connection is reused, urllib3 asks whether it was dropped (vLLM closes idle
    connections after 5 s): the same question, asked with readable_now instead of gevent's poll()."""

    @property
    def is_connected(self) -> bool:
        return self.sock is not None and not readable_now(self.sock)


class UpstreamConnection(_DropCheckedBySelect, urllib3.connection.HTTPConnection):
    pass


class UpstreamTlsConnection(_DropCheckedBySelect, urllib3.connection.HTTPSConnection):
    pass
