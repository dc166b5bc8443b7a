"""Sampling the machine during a bench run: the CPU of each process of a path and of the whole
machine, the proxy's peak RSS, and the load before and after (all from /proc)."""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

CPUS = os.cpu_count() or 1
TICK = os.sysconf("SC_CLK_TCK")


def read_cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def read_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def read_cpu_pressure_us() -> int | None:
    """Total time (us) some runnable task waited for a CPU (Linux PSI), or None without PSI."""
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(some.rsplit("total=", 1)[1])


def read_machine_ticks() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values[:8]), idle


class Sampler:
    """CPU of each process of the stack and of the whole machine, and the proxy's peak RSS, during one run."""

    def __init__(self, pids: dict[str, list[int]], rss_pids: list[int]):
        self.pids = pids
        self.rss_pids = rss_pids
        self.peak_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ticks(self) -> dict[str, int]:
        return {name: sum(read_cpu_ticks(pid) or 0 for pid in pids) for name, pids in self.pids.items()}

    def _run(self):
        while not self._stop.wait(0.1):
            rss = sum(read_rss_mb(pid) or 0 for pid in self.rss_pids)
            self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self):
        self.started = time.monotonic()
        self.ticks = self._ticks()
        self.machine = read_machine_ticks()
        self.pressure = read_cpu_pressure_us()
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.peak_rss = sum(read_rss_mb(pid) or 0 for pid in self.rss_pids)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        wall = self.wall = time.monotonic() - self.started
        ticks = self._ticks()
        total, idle = read_machine_ticks()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = {name: 100 * (ticks[name] - self.ticks[name]) / TICK / wall for name in ticks}
        # The load tool (wrk or stream_client.py) is the only child that ends during the run.
        self.cpu["client"] = 100 * ((children.ru_utime - self.children.ru_utime)
                                    + (children.ru_stime - self.children.ru_stime)) / wall
        busy = (total - self.machine[0]) - (idle - self.machine[1])
        self.machine_pct = 100 * busy / max(1, total - self.machine[0])  # of all CPUs
        pressure = read_cpu_pressure_us()
        self.pressure_pct = (100 * (pressure - self.pressure) / 1e6 / wall
                             if pressure is not None and self.pressure is not None else None)
        ours = sum(self.cpu.values())
        self.cpu["other"] = max(0.0, self.machine_pct * CPUS - ours)
        return False


def machine_busy_pct(seconds: float) -> float:
    total, idle = read_machine_ticks()
    time.sleep(seconds)
    total2, idle2 = read_machine_ticks()
    return 100 * ((total2 - total) - (idle2 - idle)) / max(1, total2 - total)


def loadavg() -> str:
    text = "load average (1/5/15 min) " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        # Pressure stall information: share of time some runnable task waited for a CPU.
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0].split()
        text += ", CPU pressure " + " ".join(field.replace("avg", "") + "%" for field in some[1:4])
    except OSError:
        pass
    return text
