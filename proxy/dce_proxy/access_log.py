"""One JSON line per request (its record, record.py): who, which route, how it ended, how long,
how many tokens.

Never the key, the raw path (it may hold /k/KEY), the prompt or the answer.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from .record import RequestRecord

access_log = logging.getLogger("dce_proxy.access")


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        fields = record.args if isinstance(record.args, dict) else None
        if fields:
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging() -> None:
    logger = logging.getLogger("dce_proxy")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def write_access_line(record: RequestRecord) -> None:
    entry = {
        "request_id": record.request_id,
        "method": record.method,
        "route": record.route,
        "status": record.status,
        "key_id": record.key,
        "worker": os.getpid(),
        "stream": record.stream,
        "latency_ms": round(record.seconds() * 1000, 2),
    }
    if record.ttft_seconds is not None:
        entry["ttft_ms"] = round(record.ttft_seconds * 1000, 2)
    if record.outcome is not None:
        entry["outcome"] = record.outcome.value
    if record.prompt_tokens is not None:
        entry["prompt_tokens"] = record.prompt_tokens
    if record.completion_tokens is not None:
        entry["completion_tokens"] = record.completion_tokens
        entry["tokens_exact"] = record.tokens_exact
    access_log.info("access", entry)
