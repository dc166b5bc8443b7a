"""Profiling (`run_bench.py --profile`): one extra, unmeasured proxy run under py-spy, and the
worker's hot spots from its stacks."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from loopback_stack import VENV_BIN
from scenarios import Runner, Scenario


def profile_run(runner: Runner, scenario: Scenario, workdir: Path) -> Path | None:
    """One extra, unmeasured proxy-path run with py-spy attached to the worker; returns collapsed stacks."""
    py_spy = VENV_BIN / "py-spy"
    py_spy = str(py_spy) if py_spy.exists() else shutil.which("py-spy")
    workers = runner.stack.proxy_workers()
    if not py_spy or not workers:
        print("  (profile skipped: py-spy or the proxy worker not found)")
        return None
    out = workdir / f"profile-{scenario.name}.txt"
    spy = subprocess.Popen([py_spy, "record", "--pid", str(workers[0]), "--rate", "200", "--nonblocking",
                            "--format", "raw", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        runner.run(scenario, "proxy")
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
    return out if out.exists() else None


def hot_spots(collapsed: Path, top: int = 12) -> list[str]:
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # A frame's text can span lines (py-spy prints some objects' repr); such fragments are skipped.
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_frame_name(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; self time:"]
    for name, samples in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * samples / total:5.1f}%  {name}")
    lines.append("inclusive (function and what it calls):")
    # The frames every request goes through (server loop, WSGI wrappers) say nothing: leave them out.
    skip = ("<module>", "run (", "switch (", "_handle_and_close_when_done", "GeventWorker.", "AsyncWorker.",
            "Flask.__call__", "Flask.wsgi_app", "ProxyFix.__call__", "PathKeyMiddleware.__call__",
            "Flask.full_dispatch_request", "Flask.dispatch_request", "Greenlet.run", "Hub.run")
    ranked = [(n, s) for n, s in sorted(inclusive.items(), key=lambda kv: -kv[1]) if not n.startswith(skip)]
    for name, samples in ranked[:top]:
        lines.append(f"  {100 * samples / total:5.1f}%  {name}")
    return lines


def _frame_name(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (to/module.py)", aggregated over the function's lines.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.split("/")
    short = "/".join(parts[-2:]) if "site-packages" not in where else "/".join(
        parts[parts.index("site-packages") + 1:])
    return f"{name} ({short})"
