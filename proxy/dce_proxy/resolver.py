"""Name lookups in the gevent workers (gunicorn.conf.py installs this as gevent's resolver).

The system's resolver, asked anew for every new connection: a cache (gevent's c-ares resolver kept
answers for the DNS lifetime) sent a recreated vLLM's connections to its old address, which Docker
had given to another container. But one lookup serves every connection that asks for the same name
while it is under way: a burst of streams on a fresh worker (or after vLLM closed its idle
connections) opens hundreds of connections to vLLM at once, and gevent's thread resolver queued a
lookup each in its pool of threads, whose handovers with the busy worker made the burst's first
tokens wait (make bench, 1,000 streams on a fresh worker: 643 open at once and a TTFT p99 of 7.2 s,
against all 1,000 and 2 s once warm).
"""

from __future__ import annotations

import _socket
from socket import EAI_AGAIN, gaierror

from gevent.event import AsyncResult
from gevent.resolver.thread import Resolver


class SharedLookups(Resolver):
    def __init__(self, hub=None):
        super().__init__(hub)
        self._under_way: dict[tuple, AsyncResult] = {}

    def getaddrinfo(self, *args, **kwargs):
        question = (args, tuple(sorted(kwargs.items())))
        answer = self._under_way.get(question)
        if answer is None:
            # Known as under way before the pool takes it: with every thread of the pool busy, the
            # spawn waits, and the askers meanwhile must wait for this lookup, not queue their own.
            answer = self._under_way[question] = AsyncResult()
            answer.rawlink(lambda done: self._forget(question, done))
            try:
                # In a thread of the pool, not in this greenlet: an asker killed meanwhile (a client
                # that left) leaves the lookup and the others waiting for it unharmed.
                self.pool.spawn(_socket.getaddrinfo, *args, **kwargs).rawlink(answer)
            except BaseException:  # killed while the pool was full: the others are told to retry
                answer.set_exception(gaierror(EAI_AGAIN, "the lookup was interrupted"))
                raise
        # As slow as the system's own lookup, whose waits resolv.conf bounds (timeout x attempts).
        return answer.get()

    def _forget(self, question: tuple, done: AsyncResult) -> None:
        if self._under_way.get(question) is done:
            del self._under_way[question]
