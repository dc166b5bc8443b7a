"""Request rate (`limits`' moving window) and in-flight generations (slots.py) per client: a 429 over
either, or, on the DCE extension's route, a wait in line for a slot. Failed authentications per address.

The rate is `limits`' moving window called once per request: its own strategy in the Redis the
workers share, or the same rule in this process (moving_window.py says why not limits' memory
store). flask-limiter, which did it before, spent about 300 µs of each request on evaluating its
decorators and exemptions around the one hit that this needs."""

from __future__ import annotations

import functools
import ipaddress
import time

import redis
from flask import Flask, current_app, request
from limits import RateLimitItem, parse, parse_many
from limits.storage import RedisStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from .config import Settings, in_redis, settings
from .errors import ApiError, limits_store_unavailable, too_many
from .metrics import QUEUE_WAITING, key_label
from .moving_window import LocalMovingWindow
from .record import current_record
from .shared_trips import REDIS_OPTIONS
from .slots import LeasedSlots, LocalSlots, Release, Ticket, slot_store

# A finished stream frees its slot at once; this only tells clients when to look again.
_SLOT_RETRY_AFTER = 2
# Routes whose requests spend no budget: the health checks.
_UNCOUNTED_BLUEPRINTS = {"health"}


def client_id() -> str:
    return current_record().key or "anonymous"


def client_address() -> str:
    """The caller's address as limits count it: an IPv6 client owns its whole /64, not one address."""
    # remote_addr is Caddy's X-Forwarded-For hop (ProxyFix), not whatever the client wrote.
    address = request.remote_addr or "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6:
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


class RateLimits:
    """The budgets of requests per client (DCE_RATE_LIMIT, one across every route) and of failed
    authentications per address (DCE_AUTH_FAILURE_LIMIT), in one store."""

    def __init__(self, storage_uri: str, rate_limit: str, auth_failure_limit: str):
        self._redis: RedisStorage | None = None
        if storage_uri.startswith("memory://"):
            self._window: LocalMovingWindow | MovingWindowRateLimiter = LocalMovingWindow()
        else:
            options = REDIS_OPTIONS if in_redis(storage_uri) else {}
            storage = storage_from_string(storage_uri, **options)
            self._window = MovingWindowRateLimiter(storage)
            self._redis = storage if isinstance(storage, RedisStorage) else None
        # Shortest window first, as flask-limiter checked them: a request refused by a short window
        # must not spend the budget of a longer one.
        self._rate = sorted(parse_many(rate_limit))
        self._auth_failures = parse(auth_failure_limit)

    def count_request(self, client: str) -> None:
        """Counts a request against its client's budget; the 429 once it is spent."""
        for limit in self._rate:
            if not self._window.hit(limit, "requests", client):
                raise self._spent(limit, client)

    def count_script(self, client: str) -> tuple[str, list[str], list] | None:
        """The Redis script that counts a request against its client's budget (limits' own, as
        MovingWindowRateLimiter.hit runs it, with its keys and arguments), for a caller that runs it
        in a script of its own (slots.py's acquire_after); true means counted, else `refusal` tells
        why not. None unless the budget is one limit kept in Redis: several are counted one after
        the other (count_request)."""
        if self._redis is None or len(self._rate) != 1:
            return None
        script = self._redis.lua_acquire_moving_window.script
        limit = self._rate[0]
        return (script.decode() if isinstance(script, bytes) else script,
                [self._redis.prefixed_key(limit.key_for("requests", client))],
                [time.time(), limit.amount, limit.get_expiry(), 1])

    def refusal(self, client: str) -> ApiError:
        """The 429 of a request that count_script's script did not count."""
        return self._spent(self._rate[0], client)

    def _spent(self, limit: RateLimitItem, client: str) -> ApiError:
        return too_many(f"Rate limit exceeded ({limit}). Retry later.", "rate_limit_exceeded",
                        self._retry_after(limit, "requests", client))

    def refuse_after_failed_authentications(self, address: str) -> None:
        if not self._window.test(self._auth_failures, "auth-failures", address):
            raise too_many("Too many requests with a wrong or missing API key from this address. Try again later.",
                           "too_many_failed_authentications",
                           self._retry_after(self._auth_failures, "auth-failures", address))

    def count_failed_authentication(self, address: str) -> None:
        self._window.hit(self._auth_failures, "auth-failures", address)

    def _retry_after(self, limit: RateLimitItem, *identifiers: str) -> int:
        return int(self._window.get_window_stats(limit, *identifiers).reset_time - time.time()) + 1


def rate_limits() -> RateLimits:
    return current_app.extensions["dce_rate_limits"]


def _slots() -> LocalSlots | LeasedSlots:
    return current_app.extensions["dce_slots"]


def refuse_after_failed_authentications() -> None:
    """A request without a valid key, from an address over its budget of them
    (DCE_AUTH_FAILURE_LIMIT), gets 429 with Retry-After instead of 401: a client that keeps sending
    a wrong key is told to wait, and a flood of them is answered without further work."""
    rate_limits().refuse_after_failed_authentications(client_address())


def count_failed_authentication() -> None:
    rate_limits().count_failed_authentication(client_address())


def count_request() -> None:
    """Every request to a route of the API counts, whatever its answer; health checks and unknown
    paths do not. A request for a generation slot is counted as it takes its slot (_take_slot)."""
    if request.url_rule is None or request.blueprint in _UNCOUNTED_BLUEPRINTS:
        return
    # (Flask answers an OPTIONS itself, without calling the view.)
    if getattr(current_app.view_functions.get(request.endpoint), "counts_its_request", False) \
            and request.method != "OPTIONS":
        return
    rate_limits().count_request(client_id())


def init_limits(app: Flask, loaded: Settings) -> None:
    """Runs after authentication (budgets are per key): register it after `authenticate`."""
    app.extensions["dce_rate_limits"] = RateLimits(loaded.ratelimit_storage_uri, loaded.rate_limit,
                                                   loaded.auth_failure_limit)
    app.extensions["dce_slots"] = slot_store(loaded.ratelimit_storage_uri)
    app.before_request(count_request)

    @app.errorhandler(redis.RedisError)
    def limits_store_down(_error: redis.RedisError):
        return limits_store_unavailable().response()


class Slot:
    """A request's in-flight slot: held from the start, or waited for in its client's line (a stream
    on /api/dce/proxy, see stream.py). Freed once, by whichever comes first: vLLM's stream ends, the
    response closes (the client went away), or the view failed; a request still in line leaves it."""

    def __init__(self, release: Release | None, ticket: Ticket | None, cap: int, key: str | None):
        self._release = release
        self._ticket = ticket
        self._cap = cap
        if ticket is not None:
            self._waiting = QUEUE_WAITING.labels(key_label(key))
            self._waiting.inc()

    def refusal(self) -> ApiError:
        """The 429 of a request that may not wait."""
        return _refusal(self._cap)

    @property
    def held(self) -> bool:
        return self._release is not None

    def wait(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for this request's turn; True once the slot is held."""
        release = self._ticket.wait(timeout)
        if release is not None:
            self._ticket, self._release = None, release
            self._waiting.dec()
        return self.held

    def free(self) -> None:
        if self._ticket is not None:
            self._ticket.leave()
            self._ticket = None
            self._waiting.dec()
        release, self._release = self._release, None
        if release is not None:
            release()


def _refusal(cap: int) -> ApiError:
    return too_many(f"Too many generations in flight for this key (limit {cap}). Wait for one to finish.",
                    "too_many_concurrent_requests", _SLOT_RETRY_AFTER)


def _take_slot(may_wait: bool) -> Slot:
    """Counts the request against its client's rate budget, then takes one of its slots: in one
    round trip when both live in Redis."""
    cap, store, rates, client = settings().max_concurrent, _slots(), rate_limits(), client_id()
    count = rates.count_script(client) if isinstance(store, LeasedSlots) else None
    if count is None:
        rates.count_request(client)
        release = store.acquire(client, cap)
    else:
        counted, release = store.acquire_after(client, cap, *count)
        if not counted:
            raise rates.refusal(client)
    if release is None and not may_wait:
        raise _refusal(cap)
    return Slot(release, None if release is not None else store.join(client, cap), cap, current_record().key)


def _holding_slot(view, may_wait: bool):
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        slot = _take_slot(may_wait)
        # The stream frees the slot the moment vLLM's stream ends, before the client gets the last
        # bytes: a client that starts its next generation at once must find the slot free.
        current_record().slot = slot
        try:
            response = view(*args, **kwargs)
        except BaseException:
            slot.free()
            raise
        if response.mimetype == "text/event-stream":
            response.call_on_close(slot.free)  # also when the client goes away mid-stream
        else:
            # A whole answer: vLLM sends its headers only once it is all generated, so the GPU is done
            # with it, and a client reading it slowly must not hold the slot its next request needs.
            slot.free()
        return response

    wrapper.counts_its_request = True  # (_take_slot does; count_request leaves it alone)
    return wrapper


def holds_generation_slot(view):
    """Wraps a view that starts a generation: over the client's cap it is a 429 with Retry-After
    (what OpenAI SDKs expect: they retry); the slot is freed when the generation ends."""
    return _holding_slot(view, may_wait=False)


def waits_for_generation_slot(view):
    """Like holds_generation_slot, but a stream over the cap waits in line for a slot instead (the
    DCE extension never retries: a 429 is a failed tab). A request that is not a stream still gets
    the 429."""
    return _holding_slot(view, may_wait=True)
