"""The in-process moving window (dce_proxy/moving_window.py) answers as limits' own moving window does."""

import random
import types

import limits.storage.memory
import pytest
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from dce_proxy import moving_window
from dce_proxy.moving_window import LocalMovingWindow


@pytest.fixture
def clock(monkeypatch):
    """The clock of both windows (ours, and limits' memory store), moved by the test only."""

    class Clock:
        now = 1_800_000_000.0

    fake = types.SimpleNamespace(time=lambda: Clock.now, monotonic=lambda: Clock.now)
    monkeypatch.setattr(moving_window, "time", fake)
    monkeypatch.setattr(limits.storage.memory, "time", fake)
    return Clock


def test_it_counts_refuses_and_resets_as_limits_does(clock):
    ours, theirs = LocalMovingWindow(), MovingWindowRateLimiter(MemoryStorage())
    limits = [parse("3/second"), parse("5/minute"), parse("2/hour")]
    rng = random.Random(7)
    for step in range(2000):
        # (never a window's exact length apart: at that instant limits' hit and stats disagree)
        clock.now += rng.choice([0.0, 0.05, 0.3, 0.7, 1.1, 13, 61]) + rng.random() / 1000
        limit, who = rng.choice(limits), rng.choice(["alice", "bob"])
        action = rng.choice(["hit", "hit", "test", "stats"])
        if action == "stats":
            assert ours.get_window_stats(limit, "requests", who).remaining == \
                theirs.get_window_stats(limit, "requests", who).remaining, step
        else:
            assert getattr(ours, action)(limit, "requests", who) == \
                getattr(theirs, action)(limit, "requests", who), (step, action)


def test_a_full_window_resets_when_its_oldest_hit_leaves_it(clock):
    window, limit = LocalMovingWindow(), parse("2/minute")
    assert window.hit(limit, "requests", "alice")
    clock.now += 20
    assert window.hit(limit, "requests", "alice")
    assert not window.hit(limit, "requests", "alice")
    assert window.get_window_stats(limit, "requests", "alice").reset_time == clock.now - 20 + 60
    assert window.hit(limit, "requests", "bob")  # another key, another budget
    clock.now += 40.5  # the first hit is out of the window
    assert window.hit(limit, "requests", "alice")
    assert not window.test(limit, "requests", "alice")


def test_keys_with_nothing_in_their_window_are_dropped(clock):
    window, limit, hour = LocalMovingWindow(), parse("30/minute"), parse("30/hour")
    for address in range(100):
        window.hit(limit, "auth-failures", f"10.0.0.{address}")
    window.hit(hour, "auth-failures", "10.0.0.1")
    clock.now += moving_window._SWEEP_SECONDS + 61
    window.hit(limit, "auth-failures", "10.0.1.1")
    assert len(window._windows) == 2  # the new one, and the hour's, whose hit is still in its window
    assert window.get_window_stats(hour, "auth-failures", "10.0.0.1").remaining == 29
