"""Request rate (flask-limiter) and in-flight generations per client, both answered with 429."""

from __future__ import annotations

import functools
import time

from flask import Flask, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded

from .errors import too_many

# A slot counter that somehow leaks (a killed worker on shared storage) heals after this long.
_SLOT_EXPIRY_SECONDS = 24 * 3600
# A finished stream frees its slot at once; this only tells clients when to look again.
_SLOT_RETRY_AFTER = 2


def client_id() -> str:
    return g.get("client_id", "anonymous")


def init_limits(app: Flask) -> Limiter:
    settings = app.config["DCE_SETTINGS"]
    limiter = Limiter(
        key_func=client_id,
        app=app,
        default_limits=[settings.rate_limit],
        storage_uri=settings.ratelimit_storage_uri,
        strategy="moving-window",
        # Its headers would put a Retry-After on every answer, not only on 429s.
        headers_enabled=False,
        default_limits_exempt_when=lambda: request.url_rule is None,
    )
    app.extensions["dce_limiter"] = limiter

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(error: RateLimitExceeded):
        current = limiter.current_limit
        retry_after = int(current.reset_at - time.time()) + 1 if current else 1
        return too_many(f"Rate limit exceeded ({error.description}). Retry later.",
                        "rate_limit_exceeded", retry_after).response()

    return limiter


class GenerationSlot:
    """One of a client's DCE_MAX_CONCURRENT in-flight generations, held until the response closes."""

    def __init__(self, storage, key: str):
        self._storage = storage
        self._key = key
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._storage.incr(self._key, _SLOT_EXPIRY_SECONDS, -1)


def acquire_slot() -> GenerationSlot:
    limiter: Limiter = current_app.extensions["dce_limiter"]
    cap = current_app.config["DCE_SETTINGS"].max_concurrent
    storage = limiter.storage
    key = f"dce-inflight/{client_id()}"
    # incr is atomic in every limits storage, so concurrent workers cannot both take the last slot.
    if storage.incr(key, _SLOT_EXPIRY_SECONDS, 1) > cap:
        storage.incr(key, _SLOT_EXPIRY_SECONDS, -1)
        raise too_many(f"Too many generations in flight for this key (limit {cap}). "
                       "Wait for one to finish.", "too_many_concurrent_requests", _SLOT_RETRY_AFTER)
    return GenerationSlot(storage, key)


def holds_generation_slot(view):
    """Wraps a view that starts a generation: the slot is freed when its response is closed,
    which for a stream is when it ends or the client goes away."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        slot = acquire_slot()
        try:
            response = view(*args, **kwargs)
        except BaseException:
            slot.release()
            raise
        response.call_on_close(slot.release)
        return response

    return wrapper
