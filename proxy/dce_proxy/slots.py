"""In-flight generation slots per client: in this process, or shared by every worker in Redis."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from typing import Callable

import redis

log = logging.getLogger("dce_proxy")

Release = Callable[[], None]

# A killed worker cannot free its slots; in Redis each slot is a lease that lapses this long after
# its worker last renewed it, so those slots come back by themselves.
LEASE_SECONDS = 30
_RENEW_EVERY_SECONDS = 10

# Atomic in Redis: drop lapsed leases, refuse at the cap, else take a lease. Redis's clock, so the
# workers' clocks do not matter.
_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 1)
return 1
"""
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


class LocalSlots:
    """One worker: a counter in this process is exact."""

    def __init__(self):
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, client: str, cap: int) -> Release | None:
        with self._lock:
            if self._held[client] >= cap:
                return None
            self._held[client] += 1

        def release():
            with self._lock:
                self._held[client] -= 1
                if not self._held[client]:
                    del self._held[client]

        return release


class LeasedSlots:
    """Several workers: one sorted set of leases per client in Redis, renewed while held."""

    def __init__(self, uri: str):
        self._redis = redis.Redis.from_url(uri, socket_timeout=2, socket_connect_timeout=2)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._held: dict[str, str] = {}  # lease id -> Redis key
        self._ids = itertools.count()
        self._renewer: threading.Thread | None = None

    def acquire(self, client: str, cap: int) -> Release | None:
        key = f"dce-slots/{client}"
        lease = f"{os.getpid()}-{id(self)}-{next(self._ids)}"
        # A RedisError here becomes the 503 of limits.py's error handler, as flask-limiter's do.
        if not self._acquire(keys=[key], args=[cap, LEASE_SECONDS, lease]):
            return None
        self._held[lease] = key
        self._start_renewer()

        def release():
            self._held.pop(lease, None)
            try:
                self._redis.zrem(key, lease)
            except redis.RedisError:
                log.warning("could not free a slot in Redis; its lease lapses within %d s", LEASE_SECONDS)

        return release

    def _start_renewer(self):
        # Started on first use, in the worker that holds the leases (gunicorn forks after import).
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_forever, name="dce-slot-leases", daemon=True)
            self._renewer.start()

    def _renew_forever(self):
        while True:
            time.sleep(_RENEW_EVERY_SECONDS)
            held = dict(self._held)
            if not held:
                continue
            try:
                self._renew(keys=list(held.values()), args=[LEASE_SECONDS, *held])
            except redis.RedisError:
                log.warning("could not renew %d slot lease(s) in Redis", len(held))


def once(release: Release) -> Release:
    """The same release, safe to call from every place that may end a generation."""
    done = False

    def release_once():
        nonlocal done
        if not done:
            done = True
            release()

    return release_once


def slot_store(storage_uri: str) -> LocalSlots | LeasedSlots:
    if storage_uri.startswith(("redis://", "rediss://")):
        return LeasedSlots(storage_uri)
    return LocalSlots()
