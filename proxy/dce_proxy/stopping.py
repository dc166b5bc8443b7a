"""A stop on its way (`make down`): every new request gets a JSON 503 with Retry-After while the
streams already running finish, so a user sees why, not a refused connection (Caddy keeps
listening until the stop reaches it). Docker's own healthcheck (/healthz) still passes.

The stop is announced by a file beside the workers' metrics files, holding the time it lapses:
every worker sees it; gunicorn empties that folder as it starts (gunicorn.conf.py), so a proxy
started again serves at once; and a stop given up without taking it back (make down cut short)
stops refusing by itself at that time. `python3 -m dce_proxy.stop` announces and takes it back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flask import request

from .errors import ApiError

RETRY_AFTER_SECONDS = 60  # a stop and a start again take about a minute
_STILL_ANSWERED = "health.healthz"


def announcement() -> Path:
    return Path(_announcement_path())


def _announcement_path() -> str:
    return os.path.join(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "/tmp/dce-metrics"), "stopping")


def announce(lapses_at: float) -> None:
    announcement().write_text(f"{lapses_at:.0f}\n")


def cancel() -> None:
    announcement().unlink(missing_ok=True)


def announced() -> bool:
    path = _announcement_path()
    # Every request asks: no announcement (nearly always) costs one system call and no exception.
    if not os.access(path, os.F_OK):
        return False
    try:
        with open(path) as text:
            return time.time() < float(text.read())
    except (OSError, ValueError):
        return False


def refuse_while_stopping() -> None:
    """Before anything else: a stopping proxy starts no new work, and says it is not ready."""
    if request.endpoint != _STILL_ANSWERED and announced():
        raise ApiError(503, "The DCE stack is stopping (maintenance or an upgrade); try again in a minute.",
                       "server_error", "stack_stopping", retry_after=RETRY_AFTER_SECONDS)
