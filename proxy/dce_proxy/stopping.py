"""A stop on its way (`make down`, scripts/down.sh): every new request gets a JSON 503 with
Retry-After while the streams already running finish, so a user sees why, not a refused
connection (Caddy keeps listening until the stop reaches it).

The stop is announced by a file beside the workers' metrics files: every worker sees it, and
gunicorn empties that folder as it starts (gunicorn.conf.py), so a proxy started again serves at once.

    python3 -m dce_proxy.stopping announce SECONDS   # then waits for the running streams, up to SECONDS
    python3 -m dce_proxy.stopping cancel             # a stop given up (Ctrl-C on make down)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from flask import current_app, request
from prometheus_client.parser import text_string_to_metric_families

from .errors import ApiError
from .report import read_metrics

RETRY_AFTER_SECONDS = 60  # a stop and a start again take about a minute
# Streams being generated, and streams waiting in line for a slot: the ones a stop waits for.
_BUSY = ("dce_proxy_streams_in_flight", "dce_proxy_queue_waiting")


def announcement() -> Path:
    return Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "/tmp/dce-metrics")) / "stopping"


def refuse_while_stopping() -> None:
    """Before anything else: a stopping proxy starts no new work (its health answers stay)."""
    if request.endpoint not in current_app.config["DCE_PUBLIC_ENDPOINTS"] and announcement().exists():
        raise ApiError(503, "The DCE stack is stopping (maintenance or an upgrade); try again in a minute.",
                       "server_error", "stack_stopping", retry_after=RETRY_AFTER_SECONDS)


def busy_streams(metrics_text: str) -> int:
    return int(sum(sample.value for family in text_string_to_metric_families(metrics_text)
                   for sample in family.samples if sample.name in _BUSY))


def announce_and_wait(grace_seconds: float, poll_seconds: float = 1.0) -> int:
    """Announces the stop, then returns once no stream runs or waits (0), or the grace is over
    (the streams still running: the services' own stop grace takes over from there)."""
    announcement().touch()
    deadline = time.monotonic() + grace_seconds
    said = None
    while True:
        busy = busy_streams(read_metrics())
        if busy != said:
            print(f"{busy} stream(s) still running" if busy else "no stream running", flush=True)
            said = busy
        if busy == 0 or time.monotonic() >= deadline:
            return busy
        time.sleep(poll_seconds)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "announce" and argv[1].isdigit():
        announce_and_wait(int(argv[1]))
        return 0
    if argv == ["cancel"]:
        announcement().unlink(missing_ok=True)
        return 0
    print("usage: python3 -m dce_proxy.stopping announce SECONDS | cancel", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
