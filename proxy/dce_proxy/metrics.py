"""The proxy's Prometheus metrics, by key name (never the key), route and outcome.

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets it), each worker writes its numbers to
files there and gunicorn's master serves their sum on DCE_METRICS_PORT, a port Caddy does not
route: the totals are right with several workers and outlive a worker that was replaced.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .record import RequestRecord

# Labels of a key: its name; every open-mode client is one ("open"), not one per address.
_NO_KEY, _OPEN_MODE = "none", "open"
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

REQUESTS = Counter("dce_proxy_requests", "Requests answered, by key, route and HTTP status.",
                   ["key", "route", "status"])
TOKENS = Counter("dce_proxy_tokens", "Tokens by key: prompt, and completion (vLLM's own count; a stream "
                 "cut before vLLM's count came counts the tokens its client was sent).", ["key", "type"])
TIME_TO_FIRST_TOKEN = Histogram("dce_proxy_time_to_first_token_seconds",
                                "From the request's arrival to its stream's first token.", ["key", "route"],
                                buckets=_SECONDS)
REQUEST_DURATION = Histogram("dce_proxy_request_duration_seconds",
                             "From the request's arrival to the end of its answer.", ["key", "route"],
                             buckets=_SECONDS)
STREAM_OUTCOMES = Counter("dce_proxy_stream_outcomes", "How streams ended: done, client_gone, "
                          "upstream_error or timeout.", ["key", "route", "outcome"])
# livesum: a replaced worker's streams are gone with it.
STREAMS_IN_FLIGHT = Gauge("dce_proxy_streams_in_flight", "Streams being generated now.", ["key"],
                          multiprocess_mode="livesum")
QUEUE_WAITING = Gauge("dce_proxy_queue_waiting", "Streams waiting in line for a generation slot.", ["key"],
                      multiprocess_mode="livesum")


def key_label(key: str | None) -> str:
    if key is None:
        return _NO_KEY
    return _OPEN_MODE if key.startswith("ip:") else key


def observe(record: RequestRecord) -> None:
    """Counts a request once its response has closed (record.init_records)."""
    key = key_label(record.key)
    REQUESTS.labels(key, record.route, str(record.status)).inc()
    REQUEST_DURATION.labels(key, record.route).observe(record.seconds())
    if record.ttft_seconds is not None:
        TIME_TO_FIRST_TOKEN.labels(key, record.route).observe(record.ttft_seconds)
    if record.prompt_tokens:
        TOKENS.labels(key, "prompt").inc(record.prompt_tokens)
    if record.completion_tokens:
        TOKENS.labels(key, "completion").inc(record.completion_tokens)
    if record.outcome is not None:
        STREAM_OUTCOMES.labels(key, record.route, record.outcome.value).inc()
