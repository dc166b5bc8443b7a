"""Rate limit per key (per client IP, the last X-Forwarded-For hop, in open
mode). Concurrency limits need a real server: see test_server.py."""

import socket
import threading

import pytest
import redis

from limits import parse

from dce_proxy.errors import ApiError
from dce_proxy.limits import RateLimits
from dce_proxy.slots import LEASE_SECONDS, LeasedSlots
from unit_helpers import ALICE_KEY, BOB_KEY, assert_error, bearer

BODY = {"prompt": "hi"}


def completions(client, headers):
    return client.post("/v1/completions", json=BODY, headers=headers)


def assert_rate_limited(r):
    assert_error(r, 429, type_="rate_limit_error")
    assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", BODY),
    ("/api/dce/generate", {"prompt": "hi", "n": 1}),
    ("/api/dce/proxy", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_sixth_request_in_a_minute_is_429(make_app, route, body):
    c = make_app(DCE_RATE_LIMIT="5/minute").test_client()
    for i in range(5):
        assert c.post(route, json=body, headers=bearer(ALICE_KEY)).status_code == 200, i
    assert_rate_limited(c.post(route, json=body, headers=bearer(ALICE_KEY)))


def test_rate_limit_is_per_key(make_app):
    c = make_app(DCE_RATE_LIMIT="5/minute").test_client()
    for _ in range(5):
        completions(c, bearer(ALICE_KEY))
    assert_rate_limited(completions(c, bearer(ALICE_KEY)))
    # Same key, other auth forms: still the same bucket.
    assert_rate_limited(completions(c, {"X-API-Key": ALICE_KEY}))
    assert_rate_limited(c.post(f"/k/{ALICE_KEY}/v1/completions", json=BODY))
    # Bob has his own bucket.
    assert completions(c, bearer(BOB_KEY)).status_code == 200


def test_health_routes_are_not_rate_limited(make_app):
    c = make_app(DCE_RATE_LIMIT="2/minute").test_client()
    for _ in range(6):
        assert c.get("/healthz").status_code == 200


def test_open_mode_limits_by_the_last_forwarded_hop(make_app):
    c = make_app(DCE_API_KEYS=None, DCE_OPEN_MODE="true", DCE_RATE_LIMIT="2/minute").test_client()

    def from_hops(hops):
        return completions(c, {"X-Forwarded-For": hops})

    assert from_hops("198.51.100.7, 203.0.113.1").status_code == 200
    assert from_hops("198.51.100.8, 203.0.113.1").status_code == 200
    # A client cannot escape its bucket by prepending hops of its own choosing.
    assert_rate_limited(from_hops("192.0.2.99, 203.0.113.1"))
    # Another client (last hop differs) is not affected.
    assert from_hops("198.51.100.7, 203.0.113.2").status_code == 200


def test_unreachable_redis_is_a_503_not_a_crash(make_app):
    c = make_app(DCE_PROXY_WORKERS="2", DCE_RATELIMIT_STORAGE_URI="redis://127.0.0.1:9/0").test_client()
    r = completions(c, bearer(ALICE_KEY))
    assert_error(r, 503, type_="server_error")
    assert r.get_json()["error"]["code"] == "limits_store_unavailable"
    assert int(r.headers["Retry-After"]) >= 1
    assert c.get("/healthz").status_code == 200


@pytest.fixture
def silent_redis():
    """A Redis that takes connections and never answers (a stuck or frozen one)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    listener.close()
    for connection in held:
        connection.close()


def test_a_redis_that_stops_answering_is_a_503_not_a_hung_request(make_app, silent_redis):
    c = make_app(DCE_PROXY_WORKERS="2", DCE_RATELIMIT_STORAGE_URI=silent_redis).test_client()
    answers = []
    asking = threading.Thread(target=lambda: answers.append(completions(c, bearer(ALICE_KEY))), daemon=True)
    asking.start()
    asking.join(20)  # the proxy gives up after its Redis timeouts (2 s each); a hang never ends
    assert answers, "the request hung on a Redis that does not answer"
    assert_error(answers[0], 503, type_="server_error")
    assert answers[0].get_json()["error"]["code"] == "limits_store_unavailable"


def test_unknown_paths_spend_no_budget(make_app):
    c = make_app(DCE_RATE_LIMIT="2/minute").test_client()
    for path in ("/static/app.js", "/nowhere", "/v1/nowhere"):
        assert c.get(path, headers=bearer(ALICE_KEY)).status_code == 404, path
    assert completions(c, bearer(ALICE_KEY)).status_code == 200
    assert completions(c, bearer(ALICE_KEY)).status_code == 200
    assert_rate_limited(completions(c, bearer(ALICE_KEY)))


def test_a_request_refused_by_a_short_window_spends_nothing_of_a_longer_one():
    rates = RateLimits("memory://", "5/hour;2/minute", "10/minute")  # listed longest first on purpose
    refused = 0
    for _ in range(6):
        try:
            rates.count_request("alice")
        except ApiError as error:
            assert error.status == 429 and 1 <= error.retry_after <= 61
            refused += 1
    assert refused == 4
    # Only the two requests served spent the hour's budget: the next minute may serve two more.
    assert rates._window.get_window_stats(parse("5/hour"), "requests", "alice").remaining == 3


def test_rate_limit_is_one_budget_across_routes(make_app):
    c = make_app(DCE_RATE_LIMIT="3/minute").test_client()
    assert completions(c, bearer(ALICE_KEY)).status_code == 200
    assert c.get("/v1/models", headers=bearer(ALICE_KEY)).status_code == 200
    assert c.post("/api/dce/generate", json={"prompt": "hi", "n": 1}, headers=bearer(ALICE_KEY)).status_code == 200
    assert_rate_limited(c.post("/api/dce/proxy", json={"messages": [{"role": "user", "content": "hi"}]},
                               headers=bearer(ALICE_KEY)))


def test_an_options_request_to_a_generation_route_counts_too(make_app):
    # Flask answers it without calling the view, where a generation request is counted.
    c = make_app(DCE_RATE_LIMIT="2/minute").test_client()
    for _ in range(2):
        assert c.options("/v1/chat/completions", headers=bearer(ALICE_KEY)).status_code == 200
    assert_rate_limited(c.options("/v1/chat/completions", headers=bearer(ALICE_KEY)))


STREAMS = {
    "/api/dce/proxy": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    "/api/dce/generate": {"prompt": "hi", "n": 1, "stream": True},
}


@pytest.mark.parametrize("route", STREAMS)
def test_the_slot_is_free_when_the_stream_ends_before_the_client_closes(make_app, route):
    # A client (or Caddy, for another client connection) may send the next generation the moment
    # [DONE] arrives, before this response is closed: the slot must already be free then.
    c = make_app(DCE_MAX_CONCURRENT="1").test_client()
    first = c.post(route, json=STREAMS[route], headers=bearer(ALICE_KEY), buffered=False)
    assert first.status_code == 200
    for chunk in first.response:
        if b"[DONE]" in chunk:
            break
    else:
        pytest.fail("no [DONE] in the stream")
    assert completions(c, bearer(ALICE_KEY)).status_code == 200
    first.close()


def test_the_slot_is_held_while_the_stream_runs(make_app, fake_vllm):
    c = make_app(DCE_MAX_CONCURRENT="1").test_client()
    fake_vllm.fault, fake_vllm.hold_stream = "stall", threading.Event()  # it stops after a token, until set
    first = c.post("/api/dce/proxy", json=STREAMS["/api/dce/proxy"], headers=bearer(ALICE_KEY), buffered=False)
    next(iter(first.response))
    assert_rate_limited(completions(c, bearer(ALICE_KEY)))
    first.close()
    fake_vllm.hold_stream.set()
    assert completions(c, bearer(ALICE_KEY)).status_code == 200


def test_the_proxys_redis_clients_do_not_name_their_library_to_redis():
    # CLIENT SETINFO: the Redis deployed (Debian's 7.0) answers it with an error, two round trips
    # more per new connection (the integration suite counts Redis's errors on the real one).
    uri = "redis://127.0.0.1:9/0"  # nothing listens: making a connection object does not connect
    limits_client = RateLimits(uri, "10/minute", "10/minute")._redis.storage
    for client in (limits_client, LeasedSlots(uri)._redis):
        assert client.connection_pool.make_connection().driver_info is None


class _FreshRedis:
    """Stands in for a Redis that has not seen any script: EVALSHA is refused (NOSCRIPT)."""

    def __init__(self):
        self.commands, self.refused = [], 0

    def execute_command(self, *command, **options):
        self.commands.append(command)
        if command[0] == "EVALSHA":
            self.refused += 1
            raise redis.exceptions.NoScriptError("No matching script")
        return len(command)


def test_renewing_slot_leases_draws_no_error_reply_from_redis():
    # Redis's error count is what an operator watches; a renewal must not add to it with nothing wrong.
    slots = LeasedSlots("redis://127.0.0.1:9/0")  # nothing listens: the client is replaced below
    server = _FreshRedis()
    slots._redis.execute_command = server.execute_command
    slots._held.update({"lease-1": "dce-slots/alice", "lease-2": "dce-slots/bob"})
    slots._renew_held()
    assert server.refused == 0
    assert [command[0] for command in server.commands] == ["EVAL"]
    assert server.commands[0][2:] == (2, "dce-slots/alice", "dce-slots/bob", LEASE_SECONDS, "lease-1", "lease-2")
