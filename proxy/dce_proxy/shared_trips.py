"""How the workers talk with Redis: its clients' options, and the Redis commands that a worker's
requests ask for at about the same time sent as one pipeline."""

from __future__ import annotations

import copy
import threading
from collections import deque

import redis

# The options of every Redis client of the workers (slots.py's and limits.py's). They give up after 2 s: a
# Redis that stopped answering is then a 503 (limits_store_unavailable), never a request that hangs
# with nothing sent. A new connection does not name its library (CLIENT SETINFO): the Redis deployed
# (Debian's 7.0) does not know that command, so each new connection cost two round trips answered
# with errors, a burst of streams opens hundreds, and the errors filled Redis's error count.
REDIS_OPTIONS = {"socket_timeout": 2, "socket_connect_timeout": 2, "driver_info": None}
# How long a request waits for the reply to a command that this worker sends with others: longer
# than redis-py's own timeouts and retries take, so that it is only a guard against a lost sender.
_SHARED_TRIP_SECONDS = 30


class _Asked:
    """One command of a shared trip and, once Redis answered, its reply (or the error)."""

    def __init__(self, command: tuple):
        self.command = command
        self.reply: object = None
        self.answered = threading.Event()


class SharedTrips:
    """Sends the commands that this worker's requests ask for at about the same time to Redis as one
    pipeline, in one round trip, and gives each request its own reply. A command costs about 120 µs
    of CPU, most of it the round trip's (redis-py's and the kernel's), and a busy worker asks for
    dozens at once: every stream of a burst takes a slot, every answer frees one.

    A trip lost on the way (Redis gone mid-pipeline) fails every request in it with a 503; leases that
    Redis may have taken for them lapse within slots.LEASE_SECONDS, as a killed worker's do. A lost trip is
    never sent again: the clients of redis.from_url do not retry, and a trip sent twice would run its
    scripts twice."""

    def __init__(self, client: redis.Redis):
        self._redis = client
        self._asked: deque[_Asked] = deque()
        self._ready = threading.Event()
        self._sender: threading.Thread | None = None
        self._starting = threading.Lock()

    def call(self, *command):
        """Redis's reply to `command`, sent with whatever else was asked meanwhile; its error raised."""
        asked = _Asked(command)
        self._asked.append(asked)
        self._start_sender()
        self._ready.set()
        if not asked.answered.wait(_SHARED_TRIP_SECONDS):
            raise redis.TimeoutError("Redis did not answer in time")
        if isinstance(asked.reply, Exception):
            raise asked.reply
        return asked.reply

    def _start_sender(self):
        # Started on first use, in the worker that asks (gunicorn forks after import). One only: a
        # thread is not alive until it has started, and starting one lets other requests run.
        if self._sender is not None and self._sender.is_alive():
            return
        with self._starting:
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send_forever, name="dce-redis-trips", daemon=True)
                self._sender.start()

    def _send_forever(self):
        while True:
            self._ready.wait()
            self._ready.clear()
            batch = []
            while self._asked:
                batch.append(self._asked.popleft())
            if batch:
                self._send(batch)

    def _send(self, batch: list[_Asked]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for asked in batch:
            pipe.execute_command(*asked.command)
        try:
            replies = pipe.execute(raise_on_error=False)
        except Exception as error:  # (the sender must outlive any error: every request waits on it)
            # One error object each: raised once per request, its traceback stays one request's.
            replies = [copy.copy(error) for _ in batch]
        finally:
            pipe.reset()
        for asked, reply in zip(batch, replies):
            asked.reply = reply
            asked.answered.set()
