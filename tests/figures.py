"""The figures a `make test` run ends with (issue 4): the unit run starts the tally, the
integration run adds to it and prints the line. Kept in a file because they are two pytest runs."""

from __future__ import annotations

import json
from pathlib import Path

FILE = Path(__file__).resolve().parents[1] / ".test-figures.json"
NAMES = {
    "requests_fuzzed": "requests fuzzed",
    "fuzz_5xx": "5xx seen",
    "faults_survived": "faults survived",
    "stream_seconds": "streams x seconds held",
    "bytes_compared": "bytes compared",
    "keys_in_logs": "keys found in logs (every key form the proxy accepts)",
    "auth_failures_refused": "unauthenticated requests refused by the limiter",
    # A step that retries (e.g. a stream opened again to reach another worker) adds its attempts beyond the first.
    "retries": "retries needed",
}


def reset() -> None:
    FILE.write_text("{}")


def add(name: str, amount: float) -> None:
    assert name in NAMES, name
    tally = _read()
    tally[name] = tally.get(name, 0) + amount
    FILE.write_text(json.dumps(tally))


def line() -> str:
    tally = _read()
    return "figures: " + ", ".join(f"{label} {round(tally.get(name, 0))}" for name, label in NAMES.items())


def _read() -> dict:
    try:
        return json.loads(FILE.read_text())
    except (OSError, ValueError):
        return {}
