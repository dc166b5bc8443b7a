"""Auth: every accepted way to present a key works, everything else is a 401
in the JSON error shape, and the health routes need no key."""

import figures
import pytest

from dce_proxy.auth import PATH_KEY_ENVIRON, PathKeyMiddleware
from unit_helpers import ALICE_KEY, BOB_KEY, assert_error, basic, bearer

CHAT = {"model": "local-model", "messages": [{"role": "user", "content": "hi"}]}

# (method, route, json body) for every route behind auth.
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"prompt": "hi"}),
    ("POST", "/api/dce/proxy", CHAT),
    ("POST", "/api/dce/generate", {"prompt": "hi", "n": 2}),
]


def call(client, method, path, body, headers=None):
    return client.open(path, method=method, json=body, headers=headers or {})


@pytest.mark.parametrize("method, route, body", ROUTES)
@pytest.mark.parametrize("headers", [
    bearer(ALICE_KEY),
    {"X-API-Key": BOB_KEY},
    basic(ALICE_KEY, user="dce"),
    basic(BOB_KEY, user="anyone"),
], ids=["bearer", "x-api-key", "basic-dce", "basic-anyuser"])
def test_header_auth_forms_are_accepted(client, method, route, body, headers):
    r = call(client, method, route, body, headers)
    assert r.status_code == 200, r.data


@pytest.mark.parametrize("method, route, body", ROUTES)
def test_key_in_path_prefix_is_accepted(client, method, route, body):
    r = call(client, method, f"/k/{ALICE_KEY}{route}", body)
    assert r.status_code == 200, r.data


@pytest.mark.parametrize("method, route, body", ROUTES)
@pytest.mark.parametrize("headers", [
    {},
    bearer("wrong-key-wwwwwwwwwwwwww"),
    bearer(ALICE_KEY + "x"),
    bearer(ALICE_KEY[:-1]),
    {"X-API-Key": ""},
    basic("wrong-key-wwwwwwwwwwwwww"),
    {"Authorization": "Basic !!!not-base64!!!"},
    {"Authorization": f"Token {ALICE_KEY}"},
    {"Authorization": "Bearer"},
], ids=["none", "wrong", "longer", "prefix", "empty-x-api-key", "wrong-basic", "bad-basic", "bad-scheme",
        "bearer-no-key"])
def test_missing_or_wrong_key_is_401_json(client, method, route, body, headers):
    r = call(client, method, route, body, headers)
    assert_error(r, 401, type_="authentication_error")


@pytest.mark.parametrize("path", ["/k/wrong-key-wwwwwwwwwwwwww/v1/models", "/k//v1/models"])
def test_wrong_key_in_path_is_401(client, path):
    assert_error(client.get(path), 401, type_="authentication_error")


def test_upstream_never_sees_the_client_key(client, fake_vllm):
    client.post(f"/k/{ALICE_KEY}/v1/completions", json={"prompt": "hi"}, headers={"X-API-Key": ALICE_KEY})
    client.post("/v1/completions", json={"prompt": "hi"}, headers=basic(ALICE_KEY))
    for rec in fake_vllm.requests:
        assert ALICE_KEY not in str(rec.headers) and ALICE_KEY not in rec.path


def test_vllm_gets_the_proxys_own_key_on_every_request(make_app, fake_vllm, tmp_path):
    # vLLM answers only this key (compose.yaml): nothing else on its network can use the GPU (issue 12).
    key_file = tmp_path / "vllm_api_key"
    key_file.write_text("vllm-key-0123456789abcdef\n")
    client = make_app(VLLM_API_KEY_FILE=str(key_file)).test_client()
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/completions", json={"prompt": "hi"}, headers=bearer(ALICE_KEY)).status_code == 200
    streamed = client.post("/api/dce/proxy", json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
                           headers=bearer(ALICE_KEY))
    assert streamed.status_code == 200 and streamed.get_data()
    assert {rec.path for rec in fake_vllm.requests} >= {"/v1/models", "/v1/completions", "/v1/chat/completions"}
    assert all(rec.headers.get("Authorization") == "Bearer vllm-key-0123456789abcdef" for rec in fake_vllm.requests)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_routes_need_no_key(client, path):
    assert client.get(path).status_code == 200


def test_open_mode_needs_no_key_on_any_route(make_app):
    c = make_app(DCE_API_KEYS=None, DCE_OPEN_MODE="true").test_client()
    for method, route, body in ROUTES:
        r = call(c, method, route, body)
        assert r.status_code == 200, (route, r.data)


@pytest.mark.parametrize("target", [f"/k/{ALICE_KEY}/v1/models?x=1", f"/%6B/{ALICE_KEY}/v1/models",
                                    f"https://dce.example/k/{ALICE_KEY}/v1/models"])
def test_a_key_in_the_path_leaves_every_copy_of_the_request_target(target):
    # gunicorn keeps the raw request target in RAW_URI and REQUEST_URI; a log of either would hold
    # the key, however the client spelled the path (issue 12).
    seen = {}

    def app(environ, start_response):
        seen.update(environ)
        return []

    # The server decodes every spelling to the same PATH_INFO.
    environ = {"PATH_INFO": f"/k/{ALICE_KEY}/v1/models", "QUERY_STRING": target.partition("?")[2], "RAW_URI": target, "REQUEST_URI": target}
    PathKeyMiddleware(app)(environ, lambda *args: None)
    assert seen[PATH_KEY_ENVIRON] == ALICE_KEY and seen["PATH_INFO"] == "/v1/models"
    leaked = {name: value for name, value in seen.items()
              if name != PATH_KEY_ENVIRON and isinstance(value, str) and ALICE_KEY in value}
    assert not leaked
    assert seen["RAW_URI"].startswith("/k/REDACTED/v1/models")


def test_an_address_that_keeps_failing_authentication_is_told_to_wait(make_app):
    # 401s used to be free: past DCE_AUTH_FAILURE_LIMIT failures an address gets 429 with
    # Retry-After for every request without a valid key. A valid key from the same address (a
    # colleague behind the same NAT) still passes, and other addresses are not affected (issue 12).
    client = make_app(DCE_AUTH_FAILURE_LIMIT="3/minute").test_client()
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    for _ in range(3):
        assert_error(client.get("/v1/models", headers={**guesser, **bearer("guessed-key-0000000000")}), 401)
    refused = client.get("/v1/models", headers={**guesser, **bearer("guessed-key-0000000001")})
    assert_error(refused, 429)
    assert refused.get_json()["error"]["code"] == "too_many_failed_authentications"
    assert int(refused.headers["Retry-After"]) >= 1
    assert_error(client.get("/v1/models", headers=guesser), 429)  # no key at all: the same
    assert client.get("/v1/models", headers={**guesser, **bearer(ALICE_KEY)}).status_code == 200
    assert_error(client.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.1"}), 401)
    figures.add("auth_failures_refused", 2)


def test_an_ipv6_client_fails_authentication_for_its_whole_64(make_app):
    client = make_app(DCE_AUTH_FAILURE_LIMIT="2/minute").test_client()
    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b"):
        assert_error(client.get("/v1/models", headers={"X-Forwarded-For": host, **bearer("guessed-key-0000000000")}), 401)
    assert_error(client.get("/v1/models", headers={"X-Forwarded-For": "2001:db8:1:2::c"}), 429)
    assert_error(client.get("/v1/models", headers={"X-Forwarded-For": "2001:db8:1:3::a"}), 401)  # another /64
    figures.add("auth_failures_refused", 1)
