"""Who is calling: API key from a header, Basic credentials or a /k/KEY/ path prefix."""

from __future__ import annotations

import hmac

from flask import request

from .config import PUBLIC_ENDPOINTS, ApiKey, settings
from .errors import unauthorized
from .keys import key_ring
from .limits import client_address, count_failed_authentication, refuse_after_failed_authentications
from .record import current_record

PATH_KEY_ENVIRON = "dce.path_key"


class PathKeyMiddleware:
    """Moves a '/k/KEY/...' prefix out of the path, because the DCE extension cannot send headers.

    The key leaves PATH_INFO before Flask sees the request, so routing, logs and
    error messages only ever see the route behind it.
    """

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/k/"):
            key, _, rest = path[3:].partition("/")
            environ[PATH_KEY_ENVIRON] = key
            environ["PATH_INFO"] = "/" + rest
            # The server's copies of the request target (however the key was spelled in it, e.g.
            # /%6B/KEY or an absolute URL) would otherwise carry the key into any log of them.
            query = environ.get("QUERY_STRING")
            redacted = "/k/REDACTED/" + rest + (f"?{query}" if query else "")
            for name in ("RAW_URI", "REQUEST_URI"):
                if name in environ:
                    environ[name] = redacted
        return self.wsgi_app(environ, start_response)


def presented_key() -> str | None:
    path_key = request.environ.get(PATH_KEY_ENVIRON)
    if path_key:
        return path_key
    header_key = request.headers.get("X-API-Key")
    if header_key:
        return header_key
    credentials = request.authorization
    if credentials is None:
        return None
    if credentials.type == "bearer":
        return credentials.token
    if credentials.type == "basic":
        return credentials.password
    return None


def find_key(candidate: str | None, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    if not candidate:
        return None
    candidate_bytes = candidate.encode("utf-8", "surrogateescape")
    match = None
    # Compare against every key, whatever matches, so timing tells nothing about which key is close.
    for key in keys:
        if hmac.compare_digest(candidate_bytes, key.secret):
            match = key
    return match


def authenticate() -> None:
    """before_request: names the caller in the request's record, the identity limits, logs and metrics use."""
    if request.url_rule is None or request.endpoint in PUBLIC_ENDPOINTS:
        return
    key = find_key(presented_key(), key_ring().keys())
    if key is not None:
        # A valid key always passes: behind one shared address (a NAT), a colleague's stale key
        # must not lock everyone else out.
        current_record().key = key.key_id
    elif settings().open_mode:
        current_record().key = f"ip:{client_address()}"
    else:
        refuse_after_failed_authentications()
        count_failed_authentication()
        raise unauthorized()
