"""What `make metrics` and `make usage` print: the proxy's own metrics (metrics.py), read from its
metrics port inside its container, as they are or as requests, errors and tokens per key since the
proxy started. python3 -m dce_proxy.report metrics|usage"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

_COLUMNS = ("requests", "errors", "prompt tokens", "completion tokens")
# A stream's status is 200 once it started: its errors are in how it ended.
_FAILED_OUTCOMES = {"upstream_error", "timeout"}


def usage_by_key(metrics_text: str) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_COLUMNS, 0))
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels, count = sample.labels, int(sample.value)
            if sample.name == "dce_proxy_requests_total":
                table[labels["key"]]["requests"] += count
                if int(labels["status"]) >= 400:
                    table[labels["key"]]["errors"] += count
            elif sample.name == "dce_proxy_stream_outcomes_total" and labels["outcome"] in _FAILED_OUTCOMES:
                table[labels["key"]]["errors"] += count
            elif sample.name == "dce_proxy_tokens_total":
                table[labels["key"]][f"{labels['type']} tokens"] += count
    return dict(table)


def format_table(usage: dict[str, dict[str, int]]) -> str:
    """One row per key (busiest first); "none" is requests without a valid key."""
    if not usage:
        return "No requests since the proxy started."
    rows = [("key", *_COLUMNS)]
    for key, counts in sorted(usage.items(), key=lambda item: (-item[1]["requests"], item[0])):
        rows.append((key, *(str(counts[column]) for column in _COLUMNS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))) for row in rows)


def read_metrics() -> str:
    port = os.environ.get("DCE_METRICS_PORT", "9100")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def main(argv: list[str]) -> int:
    if argv not in (["metrics"], ["usage"]):
        print("usage: python3 -m dce_proxy.report metrics|usage", file=sys.stderr)
        return 2
    text = read_metrics()
    print(text if argv == ["metrics"] else format_table(usage_by_key(text)), end="" if argv == ["metrics"] else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
