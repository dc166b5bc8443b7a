"""Runs inside the proxy container: a request's count against its rate budget and its generation
slot, sent to the stack's Redis as one script (slots.py's acquire_after, as limits.py's
_take_slot sends them), for a client of its own with a budget of 3 requests and a cap of 2 slots.
Prints one JSON line: per request whether it was counted and got a slot; what limits' own reading
of the window says is left; the leases held before and after they were freed; the refusal; and the
errors Redis answered meanwhile ("ERR", e.g. to a command it does not know)."""

import json
import uuid

import redis
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from dce_proxy.config import load_settings
from dce_proxy.limits import RateLimits
from dce_proxy.shared_trips import REDIS_OPTIONS
from dce_proxy.slots import LeasedSlots

uri = load_settings().ratelimit_storage_uri
observer = redis.Redis.from_url(uri, **REDIS_OPTIONS)
errors = lambda: observer.info("errorstats").get("errorstat_ERR", {}).get("count", 0)  # noqa: E731
errors_before = errors()
client, budget, cap = f"one-trip-{uuid.uuid4().hex}", "3/minute", 2
rates, slots = RateLimits(uri, budget, "10/minute"), LeasedSlots(uri)
leases = lambda: observer.zcard(f"dce-slots/{client}")  # noqa: E731

taken, releases = [], []
for _ in range(4):
    counted, release = slots.acquire_after(client, cap, *rates.count_script(client))
    taken.append([bool(counted), release is not None])
    releases.append(release)
held = leases()
for release in filter(None, releases):
    release()
freed = leases()
# Slots free again, the budget spent: the request is refused and takes no slot.
counted, release = slots.acquire_after(client, cap, *rates.count_script(client))
taken.append([bool(counted), release is not None])
refusal = rates.refusal(client)
redis_errors = errors() - errors_before
left = MovingWindowRateLimiter(storage_from_string(uri, **REDIS_OPTIONS)).get_window_stats(parse(budget), "requests", client).remaining
print(json.dumps({"taken": taken, "left": left, "held": held, "freed": freed, "after_refusal": leases(),
                  "refusal": [refusal.status, refusal.message],
                  "redis_errors": redis_errors}))
