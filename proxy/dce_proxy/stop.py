"""`make down`'s first step, run in the proxy's container (scripts/down.sh):

    python3 -m dce_proxy.stop announce   # new requests get the stop's 503 (stopping.py); then waits
                                         # for the running streams, up to DCE_STOP_GRACE_SECONDS
    python3 -m dce_proxy.stop cancel     # a stop given up: the proxy serves again
"""

from __future__ import annotations

import os
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from . import stopping
from .report import read_metrics

# Streams being generated, and streams waiting in line for a slot: the ones a stop waits for.
_BUSY = ("dce_proxy_streams_in_flight", "dce_proxy_queue_waiting")
# After the wait here, `docker compose down` gives each service the same grace again: the
# announcement holds through both, and a little more.
_LAPSES_AFTER_GRACES = 2
_LAPSE_MARGIN_SECONDS = 60


def busy_streams(metrics_text: str) -> int:
    return int(sum(sample.value for family in text_string_to_metric_families(metrics_text)
                   for sample in family.samples if sample.name in _BUSY))


def announce_and_wait(grace_seconds: float, poll_seconds: float = 1.0) -> int:
    """Announces the stop, then returns once no stream runs or waits (0), or the grace is over
    (the streams still running: the services' own stop grace takes over from there)."""
    now = time.time()
    stopping.announce(now + _LAPSES_AFTER_GRACES * grace_seconds + _LAPSE_MARGIN_SECONDS)
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
    if argv == ["announce"]:
        # The grace the proxy itself runs with (compose passes it): the one gunicorn drains for.
        announce_and_wait(float(os.environ.get("DCE_STOP_GRACE_SECONDS", "600")))
        return 0
    if argv == ["cancel"]:
        stopping.cancel()
        return 0
    print("usage: python3 -m dce_proxy.stop announce | cancel", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
