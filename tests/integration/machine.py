"""What the machine itself did while a test ran, printed with the test's failure (conftest.py).

On the 2-core CI machines every process of the stack has been seen frozen for up to a minute at a
time (issue 10): gunicorn's two workers missed their heartbeat in the same second, new connections
waited 50 s. A failure then says little about the product unless the report also says whether the
machine was working: how long every task waited on the disk at once (Linux PSI "io full"), how many
pages had to be read back from disk (the VM's DAMON reclaimer pages out file pages idle for 60 s),
how late this test process's own clock ticks came, and whether the proxy's workers were killed for
a missed heartbeat, and where each was.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

_TICK_SECONDS = 0.1


def _psi_total_seconds(resource: str, line: str) -> float:
    try:
        with open(f"/proc/pressure/{resource}") as f:
            for row in f:
                if row.startswith(line):
                    return int(row.rsplit("total=", 1)[1]) / 1e6
    except OSError:
        pass
    return 0.0


def _vmstat(name: str) -> int:
    try:
        with open("/proc/vmstat") as f:
            for row in f:
                key, value = row.split()
                if key == name:
                    return int(value)
    except OSError:
        pass
    return 0


@dataclass
class _Counters:
    wall: float
    io_full: float
    io_some: float
    cpu_some: float
    major_faults: int

    @classmethod
    def now(cls) -> "_Counters":
        return cls(time.monotonic(), _psi_total_seconds("io", "full"), _psi_total_seconds("io", "some"),
                   _psi_total_seconds("cpu", "some"), _vmstat("pgmajfault"))


class Watch:
    """Counts from start() to stop(); a thread ticks every 0.1 s and keeps its worst lateness."""

    def __init__(self):
        self.started_at = time.time()  # wall clock, for logs since then
        self._start = _Counters.now()
        self._end: _Counters | None = None
        self.worst_tick_late = 0.0
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="machine-watch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        last = time.monotonic()
        while not self._stopped.wait(_TICK_SECONDS):
            now = time.monotonic()
            self.worst_tick_late = max(self.worst_tick_late, now - last - _TICK_SECONDS)
            last = now

    def stop(self) -> None:
        self._stopped.set()
        self._end = _Counters.now()

    def summary(self, proxy_log: str = "") -> str:
        start, end = self._start, self._end or _Counters.now()
        worker_timeouts = proxy_log.count("WORKER TIMEOUT")
        return (f"during the test's {end.wall - start.wall:.0f} s: every task stalled on the disk at once "
                f"{end.io_full - start.io_full:.1f} s (some {end.io_some - start.io_some:.1f} s), "
                f"tasks waited for a CPU {end.cpu_some - start.cpu_some:.1f} s, "
                f"{end.major_faults - start.major_faults} pages read back from disk, "
                f"this process's 0.1-s ticks up to {self.worst_tick_late:.1f} s late, "
                f"proxy workers killed for a missed heartbeat: {worker_timeouts}") + _warnings(proxy_log) + \
            "".join(f"\n{where}" for where in where_workers_stuck(proxy_log))


def where_workers_stuck(proxy_log: str) -> list[str]:
    """Where each worker stopped for a missed heartbeat was (gunicorn.conf.py's worker_abort logs the
    stack of the code it was running, innermost last; on a starved machine that may be the hub's)."""
    found, lines = [], proxy_log.splitlines()
    for i, line in enumerate(lines):
        if "missed its heartbeat" in line:
            where = [line]
            for following in lines[i + 1:]:
                if not following.startswith(" "):
                    break
                where.append(following)
            found.append("\n".join(where))
    return found


def _warnings(proxy_log: str) -> str:
    """The proxy's warnings and errors meanwhile (e.g. a slot lease it could not renew), each once."""
    found: dict[str, int] = {}
    for line in proxy_log.splitlines():
        if '"level": "warning"' in line or '"level": "error"' in line:
            message = line.partition('"message": ')[2][:200] or line[-200:]
            found[message] = found.get(message, 0) + 1
    if not found:
        return "; the proxy logged no warning or error"
    return "; the proxy's warnings and errors (count, message):\n" + "\n".join(
        f"  {count} x {message}" for message, count in found.items())
