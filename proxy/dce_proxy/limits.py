"""Request rate (flask-limiter) and in-flight generations (slots.py) per client, both answered with 429."""

from __future__ import annotations

import functools
import time

import redis
from flask import Flask, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded

from .errors import limits_store_unavailable, too_many
from .slots import Release, once, slot_store

# Where a view's request keeps the callback that frees its generation slot (see the relay).
GENERATION_ENDED = "dce.generation_ended"
# A finished stream frees its slot at once; this only tells clients when to look again.
_SLOT_RETRY_AFTER = 2


def client_id() -> str:
    return g.get("client_id", "anonymous")


def init_limits(app: Flask) -> Limiter:
    settings = app.config["DCE_SETTINGS"]
    limiter = Limiter(
        key_func=client_id,
        app=app,
        # One budget per client across every route: default_limits would give each route its own.
        application_limits=[settings.rate_limit],
        storage_uri=settings.ratelimit_storage_uri,
        strategy="moving-window",
        # Its headers would put a Retry-After on every answer, not only on 429s.
        headers_enabled=False,
        application_limits_exempt_when=lambda: request.url_rule is None,
    )
    app.extensions["dce_limiter"] = limiter
    app.extensions["dce_slots"] = slot_store(settings.ratelimit_storage_uri)

    @app.errorhandler(redis.RedisError)
    def limits_store_down(_error: redis.RedisError):
        return limits_store_unavailable().response()

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(error: RateLimitExceeded):
        current = limiter.current_limit
        retry_after = int(current.reset_at - time.time()) + 1 if current else 1
        return too_many(f"Rate limit exceeded ({error.description}). Retry later.",
                        "rate_limit_exceeded", retry_after).response()

    return limiter


def acquire_slot() -> Release:
    cap = current_app.config["DCE_SETTINGS"].max_concurrent
    release = current_app.extensions["dce_slots"].acquire(client_id(), cap)
    if release is None:
        raise too_many(f"Too many generations in flight for this key (limit {cap}). "
                       "Wait for one to finish.", "too_many_concurrent_requests", _SLOT_RETRY_AFTER)
    return once(release)


def holds_generation_slot(view):
    """Wraps a view that starts a generation: the slot is freed when its response is closed,
    which for a stream is when it ends or the client goes away."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        release = acquire_slot()
        # The relay frees the slot the moment vLLM's stream ends, before the client gets the last
        # bytes: a client that starts its next generation at once must find the slot free.
        request.environ[GENERATION_ENDED] = release
        try:
            response = view(*args, **kwargs)
        except BaseException:
            release()
            raise
        if response.is_streamed:
            response.call_on_close(release)  # also when the client goes away mid-stream
        else:
            release()  # the whole answer is already read from vLLM
        return response

    return wrapper
