"""limits' moving window kept in this process, for one worker (limits' own, in Redis, serves several).

The rule is limits' MovingWindowRateLimiter's, with the part of its interface that limits.py uses
(hit, test, get_window_stats, one unit per hit): a hit counts if fewer than the limit's amount were
counted within its window; the window resets when the oldest of those leaves it. (A hit exactly one
window old still counts here, for every method, as it does in limits' hit; limits' test and
stats leave it out.) Here a deque of times per key, pruned as it is used, instead of limits'
MemoryStorage, which prunes in a thread that it starts again every 10 ms: under gevent, a request
that finds that thread not (yet) running starts another and waits a turn of the loop for it. In a
burst of 1,000 streams nearly every request did, and that wait was 400 ms of a first token's 1.3 s
(make bench, p50); the JSON requests at 32 connections spent about 55 µs each in it.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from limits import RateLimitItem, WindowStats

# Keys with nothing left in their window are dropped this often (addresses counted once go away).
_SWEEP_SECONDS = 60.0


class LocalMovingWindow:
    def __init__(self):
        self._windows: dict[str, tuple[int, deque[float]]] = {}  # key -> (window seconds, hit times)
        self._lock = threading.Lock()  # for real threads (the unit suite's); under gevent nothing switches inside
        self._next_sweep = time.monotonic() + _SWEEP_SECONDS

    def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        """Counts one hit, unless the window is full; True if it was counted."""
        with self._lock:
            hits = self._current(item, identifiers)
            if len(hits) >= item.amount:
                return False
            hits.append(time.time())
            return True

    def test(self, item: RateLimitItem, *identifiers: str) -> bool:
        """Whether a hit would be counted now."""
        with self._lock:
            return len(self._current(item, identifiers)) < item.amount

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        with self._lock:
            hits = self._current(item, identifiers)
            return WindowStats((hits[0] if hits else time.time()) + item.get_expiry(), item.amount - len(hits))

    def _current(self, item: RateLimitItem, identifiers: tuple[str, ...]) -> deque[float]:
        """The key's hits still within its window."""
        self._sweep()
        key = item.key_for(*identifiers)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = (item.get_expiry(), deque())
        seconds, hits = window
        start = time.time() - seconds
        while hits and hits[0] < start:
            hits.popleft()
        return hits

    def _sweep(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + _SWEEP_SECONDS
        now = time.time()
        for key, (seconds, hits) in list(self._windows.items()):
            if not hits or hits[-1] < now - seconds:
                del self._windows[key]
