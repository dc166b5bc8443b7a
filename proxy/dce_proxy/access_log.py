"""One JSON line per request: who, which route, how it ended, how long, how many tokens.

Never the key, the raw path (it may hold /k/KEY), the prompt or the answer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid

from flask import Flask, Response, g, request

access_log = logging.getLogger("dce_proxy.access")
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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


def init_access_log(app: Flask) -> None:
    configure_logging()

    @app.before_request
    def start_clock():
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _CLIENT_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def log_when_closed(response: Response) -> Response:
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-Id"] = request_id
        if request.endpoint in app.config["DCE_PUBLIC_ENDPOINTS"] and response.status_code < 400:
            return response  # Docker's health probe every 10 s would drown the real traffic
        entry = {
            "request_id": request_id,
            "method": request.method,
            "route": request.url_rule.rule if request.url_rule else "unmatched",
            "status": response.status_code,
            "key_id": g.get("client_id"),
            "worker": os.getpid(),
            "stream": response.mimetype == "text/event-stream",
        }
        counts = request.environ.setdefault("dce.stats", {})
        started = g.get("started", time.perf_counter())

        def write():
            # A stream's line is written when it ends, so latency and counts cover all of it.
            entry["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            entry.update(counts)
            access_log.info("access", entry)

        response.call_on_close(write)
        return response
