"""Browsers: the origins of DCE_CORS_ORIGINS may call the API from a page (flask-cors writes the
headers). Off by default. A preflight (OPTIONS with Access-Control-Request-Method) is answered
before the key check, which a browser's preflight cannot pass: it never carries credentials. It
gets the CORS headers only from a listed origin, so a browser refuses the call from any other."""

from __future__ import annotations

import re

from flask import Flask, Response, current_app, request
from flask_cors import CORS

# What a client may read besides the body: when to retry, and which request to quote.
_EXPOSED_HEADERS = ["Retry-After", "X-Request-Id"]
# How long a browser may keep a preflight's answer (Chromium keeps it at most 2 hours).
_PREFLIGHT_MAX_AGE = 600


def init_cors(app: Flask, origins: tuple[str, ...]) -> None:
    """Register before authentication: the preflight must not be asked for a key."""
    if not origins:
        return
    # Each origin as an exact, case-insensitive pattern: flask-cors reads a plain string holding "["
    # (an IPv6 origin) as a regular expression. Patterns also make it send Vary: Origin.
    exact = [re.compile(re.escape(origin) + r"\Z", re.IGNORECASE) for origin in origins]
    # always_send off: a client that sends no Origin (not a browser) is not told the trusted pages.
    CORS(app, origins=exact, methods=["GET", "POST"], expose_headers=_EXPOSED_HEADERS,
         max_age=_PREFLIGHT_MAX_AGE, supports_credentials=False, always_send=False)
    app.before_request(_answer_preflight)


def _answer_preflight() -> Response | None:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return current_app.make_default_options_response()
    return None
