"""In-flight generation slots per client, in this process or shared by every worker in Redis, and the
first-come-first-served line of requests waiting for one."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from typing import Callable

import redis

from .config import in_redis
from .shared_trips import REDIS_OPTIONS, SharedTrips

log = logging.getLogger("dce_proxy")

Release = Callable[[], None]

# A killed worker cannot free its slots; in Redis each slot is a lease that lapses this long after
# its worker last renewed it, so those slots come back by themselves. A live worker renews far more
# often than that: on two starved cores (a CI run whose tasks waited for a CPU 31 of 36 s) a worker
# must not lose the leases of streams it still runs, which would let its key past its cap.
LEASE_SECONDS = 60
_RENEW_EVERY_SECONDS = 5
# How often the first request of a line asks again for a slot that may have been freed elsewhere.
_RETRY_SECONDS = 0.2


def _acquire_script(key: str, cap: str, seconds: str, lease: str) -> str:
    """Atomic in Redis: drop lapsed leases, refuse at the cap, else take a lease (1; 0 when full).
    Redis's clock, so the workers' clocks do not matter. Its key and arguments where the caller says."""
    return f"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', {key}, '-inf', now)
if redis.call('ZCARD', {key}) >= tonumber({cap}) then return 0 end
redis.call('ZADD', {key}, now + tonumber({seconds}), {lease})
redis.call('EXPIRE', {key}, tonumber({seconds}) + 1)
return 1
"""


_ACQUIRE = _acquire_script("KEYS[1]", "ARGV[1]", "ARGV[2]", "ARGV[3]")


@functools.lru_cache(maxsize=8)
def _acquire_after(script: str, keys: int, args: int) -> str:
    """One script: `script` (its `keys` keys and `args` arguments first) runs, and only if it
    returns true a lease is taken (the key and arguments after its own); returns {1 or 0, 1 or 0}."""
    slot = _acquire_script(f"KEYS[{keys + 1}]", f"ARGV[{args + 1}]", f"ARGV[{args + 2}]", f"ARGV[{args + 3}]")
    return (f"local function passes()\n{script}\nend\nif not passes() then return {{0, 0}} end\n"
            f"local function take()\n{slot}\nend\nreturn {{1, take()}}\n")


# Renews leases still held (XX: a lease that already lapsed is not brought back).
_RENEW = """
local clock = redis.call('TIME')
local lapse = tonumber(clock[1]) + tonumber(clock[2]) / 1e6 + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', lapse, ARGV[i + 1])
  redis.call('EXPIRE', key, tonumber(ARGV[1]) + 1)
end
return #KEYS
"""


class Ticket:
    """One request's place in its client's line, in this worker."""

    def __init__(self, line: "_Line", client: str, cap: int):
        self.client = client
        self.cap = cap
        self._line = line
        self.woken = threading.Event()

    def wait(self, timeout: float) -> Release | None:
        """The slot, if this ticket's turn came and a slot was free within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            release = self._line.take_if_first(self)
            if release is not None:
                return release
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Woken by a release in this worker; a slot freed elsewhere (Redis) is seen on the retry.
            self.woken.wait(min(remaining, _RETRY_SECONDS))
            self.woken.clear()

    def leave(self) -> None:
        self._line.leave(self)


class _Line:
    """This worker's requests waiting for a slot, one first-come-first-served line per client."""

    def __init__(self, take: Callable[[str, int], Release | None]):
        self._take = take
        self._lock = threading.Lock()
        self._waiting: dict[str, deque[Ticket]] = {}

    def busy(self, client: str) -> bool:
        return bool(self._waiting.get(client))

    def join(self, client: str, cap: int) -> Ticket:
        ticket = Ticket(self, client, cap)
        with self._lock:
            self._waiting.setdefault(client, deque()).append(ticket)
        return ticket

    def take_if_first(self, ticket: Ticket) -> Release | None:
        with self._lock:
            line = self._waiting.get(ticket.client)
            if not line or line[0] is not ticket:
                return None
            release = self._take(ticket.client, ticket.cap)
            if release is not None:
                self._pop_first(ticket.client)
            return release

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            line = self._waiting.get(ticket.client)
            if not line or ticket not in line:
                return
            if line[0] is ticket:
                self._pop_first(ticket.client)
            else:
                line.remove(ticket)

    def wake(self, client: str) -> None:
        """A slot of `client` was freed: the first in its line tries for it now."""
        line = self._waiting.get(client)
        if line:
            line[0].woken.set()

    def _pop_first(self, client: str) -> None:
        line = self._waiting[client]
        line.popleft()
        if line:
            line[0].woken.set()  # the next one's turn: it tries at once
        else:
            del self._waiting[client]


class _Slots:
    """A cap of slots per client. A request that finds the cap full either gives up (acquire) or
    joins its client's line (join); nobody takes a slot past a client's waiting line."""

    def __init__(self):
        self._line = _Line(self._take)

    def acquire(self, client: str, cap: int) -> Release | None:
        if self._line.busy(client):
            return None
        return self._take(client, cap)

    def join(self, client: str, cap: int) -> Ticket:
        return self._line.join(client, cap)

    def _take(self, client: str, cap: int) -> Release | None:
        raise NotImplementedError


class LocalSlots(_Slots):
    """One worker: a counter in this process is exact, and its line is the whole service's."""

    def __init__(self):
        super().__init__()
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _take(self, client: str, cap: int) -> Release | None:
        with self._lock:
            if self._held[client] >= cap:
                return None
            self._held[client] += 1

        def release():
            with self._lock:
                self._held[client] -= 1
                if not self._held[client]:
                    del self._held[client]
            self._line.wake(client)

        return release


class LeasedSlots(_Slots):
    """Several workers: one sorted set of leases per client in Redis, renewed while held.

    Each worker keeps its own waiting line, whose first request asks Redis every _RETRY_SECONDS (at
    once when a slot of this worker frees): the order is first-come-first-served within a worker,
    not across workers.
    """

    def __init__(self, uri: str):
        super().__init__()
        self._redis = redis.Redis.from_url(uri, **REDIS_OPTIONS)
        self._trips = SharedTrips(self._redis)
        self._held: dict[str, str] = {}  # lease id -> Redis key
        self._ids = itertools.count()
        self._renewer: threading.Thread | None = None

    def _take(self, client: str, cap: int) -> Release | None:
        key, lease = self._new_lease(client)
        # A RedisError here becomes the 503 of limits.py's error handler, as the rate limits' do.
        if not self._trips.call("EVAL", _ACQUIRE, 1, key, cap, LEASE_SECONDS, lease):
            return None
        return self._held_lease(client, key, lease)

    def acquire_after(self, client: str, cap: int, script: str, keys: list[str],
                      args: list) -> tuple[bool, Release | None]:
        """acquire() for a request that a script must pass first (its count against its rate
        budget), both in one round trip and one script, so that no refused request holds a slot
        even for a moment: a command to Redis costs about 120 µs of CPU, most of it the client's.
        Returns whether the script passed, and the slot if one was free."""
        if self._line.busy(client):  # (no slot past this worker's line: the request joins it)
            return bool(self._trips.call("EVAL", script, len(keys), *keys, *args)), None
        key, lease = self._new_lease(client)
        passed, took = self._trips.call("EVAL", _acquire_after(script, len(keys), len(args)), len(keys) + 1,
                                        *keys, key, *args, cap, LEASE_SECONDS, lease)
        return bool(passed), self._held_lease(client, key, lease) if took else None

    def _new_lease(self, client: str) -> tuple[str, str]:
        return f"dce-slots/{client}", f"{os.getpid()}-{id(self)}-{next(self._ids)}"

    def _held_lease(self, client: str, key: str, lease: str) -> Release:
        self._held[lease] = key
        self._start_renewer()

        def release():
            self._held.pop(lease, None)
            try:
                self._trips.call("ZREM", key, lease)
            except redis.RedisError:
                log.warning("could not free a slot in Redis; its lease lapses within %d s", LEASE_SECONDS)
            self._line.wake(client)

        return release

    def _start_renewer(self):
        # Started on first use, in the worker that holds the leases (gunicorn forks after import).
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_forever, name="dce-slot-leases", daemon=True)
            self._renewer.start()

    def _renew_forever(self):
        while True:
            time.sleep(_RENEW_EVERY_SECONDS)
            self._renew_held()

    def _renew_held(self):
        held = dict(self._held)
        if not held:
            return
        try:
            # EVAL, as every slot command: redis-py's EVALSHA is first refused (NOSCRIPT) by a
            # Redis that has not seen the script, an error reply in its count with nothing wrong.
            self._redis.eval(_RENEW, len(held), *held.values(), LEASE_SECONDS, *held)
        except redis.RedisError:
            log.warning("could not renew %d slot lease(s) in Redis", len(held))


def slot_store(storage_uri: str) -> LocalSlots | LeasedSlots:
    if in_redis(storage_uri):
        return LeasedSlots(storage_uri)
    return LocalSlots()
