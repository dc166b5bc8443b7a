"""Every route of the contract, happy path, against the fake vLLM."""

import json

import pytest

from fake_vllm import models_body
from unit_helpers import (ALICE_KEY, DCE_EXTENSION_BODY, basic, bearer, closed_port_url, sse_json,
                          without_usage_event)
from wire import read_extension_body

AUTH = bearer(ALICE_KEY)
CHAT = {"model": "local-model", "messages": [{"role": "user", "content": "hi"}]}


def test_healthz_is_ok_without_calling_upstream(client, fake_vllm):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}
    assert fake_vllm.requests == []


def test_readyz_reports_model_and_context(client):
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ready", "model": "tiny", "max_model_len": 4096}


def test_readyz_is_503_when_upstream_is_down(make_app):
    r = make_app(VLLM_URL=closed_port_url()).test_client().get("/readyz")
    assert r.status_code == 503
    assert isinstance(r.get_json()["error"]["message"], str)


def test_models_passes_the_upstream_body_through(client):
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert r.get_json() == models_body(("tiny",), 4096)


def test_every_response_carries_a_request_id(client):
    ids = {client.get(path, headers=AUTH).headers.get("X-Request-Id") for path in ("/healthz", "/v1/models", "/nope")}
    assert None not in ids and len(ids) == 3


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "local-model", "prompt": "hi"}),
])
def test_openai_routes_non_stream_body_untouched(client, fake_vllm, route, body):
    r = client.post(route, json=body, headers=AUTH)
    assert r.status_code == 200
    # Same JSON document as vLLM's (the proxy may re-encode it: spacing differs).
    assert r.get_json() == json.loads(fake_vllm.generation_requests[-1].response_body)


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "local-model", "prompt": "hi"}),
])
@pytest.mark.parametrize("usage_asked", [False, True])
def test_openai_routes_stream_bytes_untouched(client, fake_vllm, route, body, usage_asked):
    fake_vllm.n_chunks = 5
    options = {"stream_options": {"include_usage": True}} if usage_asked else {}
    r = client.post(route, json={**body, "stream": True, "n": 2, **options}, headers=AUTH)
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream"
    received = r.get_data()  # the whole stream: vLLM has sent all of it
    sent = bytes(fake_vllm.generation_requests[-1].response_body)
    # Every stream asks vLLM for its usage; only a client that asked too gets that event.
    assert fake_vllm.last_body["stream_options"]["include_usage"] is True
    assert received == (sent if usage_asked else without_usage_event(sent))
    events = sse_json(r.get_data())
    # vLLM 0.32: a role chunk per chat choice, then the content chunks, the last one with finish_reason.
    assert len(events) == 2 * (5 + (1 if route.endswith("chat/completions") else 0)) + usage_asked
    assert ("usage" in events[-1]) == usage_asked


@pytest.mark.parametrize("auth", ["path", "basic"])
def test_dce_extension_request_streams_like_the_extension_expects(client, fake_vllm, auth):
    """The exact request of the DCE extension v1.2.0: only a Content-Type
    header, the key in the path (or Basic), parsed the way the extension does."""
    fake_vllm.n_chunks = 6
    if auth == "path":
        r = client.post(f"/k/{ALICE_KEY}/api/dce/proxy", data=json.dumps(DCE_EXTENSION_BODY),
                        headers={"Content-Type": "application/json"})
    else:
        r = client.post("/api/dce/proxy", data=json.dumps(DCE_EXTENSION_BODY),
                        headers={"Content-Type": "application/json", **basic(ALICE_KEY)})
    assert r.status_code == 200, r.data
    assert r.mimetype == "text/event-stream"
    assert read_extension_body(r.get_data()).shown == (fake_vllm.expected_text(0), "stop")
    sent = fake_vllm.last_body
    assert sent["model"] == "tiny" and sent["max_tokens"] == 4096 and sent["stream"] is True
    assert sent["messages"] == DCE_EXTENSION_BODY["messages"]


def test_dce_proxy_non_stream(client, fake_vllm):
    r = client.post("/api/dce/proxy", json={**DCE_EXTENSION_BODY, "stream": False}, headers=AUTH)
    assert r.status_code == 200
    assert r.get_json()["choices"][0]["message"]["content"] == fake_vllm.expected_text(0)
