"""Error answers: bad requests (4xx in the JSON error shape) and upstream
faults (502 / 503 / 504, mid-stream error events, vLLM errors passed through)."""

import json
import socket

import pytest

from dce_proxy.config import load_settings
from dce_proxy.errors import ApiError
from dce_proxy.upstream import Upstream, UpstreamStreamError
from unit_helpers import (ALICE_KEY, DCE_EXTENSION_BODY, access_lines, assert_error, bearer, closed_port_url,
                          vllm_answering_once)
from wire import read_extension_body, sse_events

AUTH = bearer(ALICE_KEY)
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "hi"}]

# One valid non-stream request per generation route.
GENERATION = [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/api/dce/proxy", {"messages": MESSAGES}),
    ("/api/dce/generate", {"prompt": "hi", "n": 2}),
]
POST_ROUTES = [route for route, _ in GENERATION]
# Whole answers relayed as vLLM sends them (relay._passed_through), not rebuilt.
PASSED_THROUGH = ["/v1/chat/completions", "/v1/completions"]


# -- client errors ------------------------------------------------------------------
@pytest.mark.parametrize("route", POST_ROUTES)
def test_malformed_json_is_400(client, route):
    assert_error(client.post(route, data=b'{"messages": [', headers=JSON_AUTH), 400, type_="invalid_request_error")


@pytest.mark.parametrize("route", POST_ROUTES)
def test_body_not_an_object_is_400(client, route):
    assert_error(client.post(route, data=b'["a"]', headers=JSON_AUTH), 400, type_="invalid_request_error")


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_post_without_json_content_type_is_415(client, route, content_type):
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    assert_error(client.post(route, data=b'{"prompt": "hi"}', headers=headers), 415)


@pytest.mark.parametrize("route", POST_ROUTES)
def test_get_on_a_post_route_is_405(client, route):
    assert_error(client.get(route, headers=AUTH), 405)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_wrong_method_on_models_is_405(client, method):
    assert_error(client.open("/v1/models", method=method, headers=JSON_AUTH, data=b"{}"), 405)


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/api/dce", f"/k/{ALICE_KEY}/nope", "/v2/models"])
def test_unknown_path_is_404(client, path):
    assert_error(client.get(path, headers=AUTH), 404)


def test_deeply_nested_json_is_a_client_error(client):
    # Python's json raises RecursionError (not ValueError) on deep nesting.
    body = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/api/dce/generate", data=body, headers=JSON_AUTH)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)


@pytest.mark.parametrize("route", POST_ROUTES)
def test_body_over_the_cap_is_413(make_app, fake_vllm, route):
    c = make_app(DCE_MAX_BODY_MB="1").test_client()
    big = json.dumps({"prompt": "x" * (1024 * 1024 + 10), "messages": MESSAGES}).encode()
    assert_error(c.post(route, data=big, headers=JSON_AUTH), 413)
    assert fake_vllm.generation_requests == []
    # Just under the cap is fine.
    ok = {"prompt": "x" * 1000, "messages": MESSAGES, "n": 1}
    assert c.post(route, json=ok, headers=AUTH).status_code == 200


# -- upstream faults ---------------------------------------------------------------------
@pytest.mark.parametrize("route, body", GENERATION)
def test_upstream_unreachable_is_503_with_retry_after(make_app, route, body):
    r = make_app(VLLM_URL=closed_port_url()).test_client().post(route, json=body, headers=AUTH)
    assert_error(r, 503)
    assert r.headers.get("Retry-After", "").isdigit()


def test_models_unreachable_is_503(make_app):
    r = make_app(VLLM_URL=closed_port_url()).test_client().get("/v1/models", headers=AUTH)
    assert_error(r, 503)
    assert r.headers.get("Retry-After")


@pytest.mark.parametrize("status, reason", [
    ({"state": "downloading", "percent": 43, "done_bytes": 5_200_000_000, "total_bytes": 12_100_000_000},
     "downloading the model: 43 % (5.2 of 12.1 GB)"),
    ({"state": "failed", "reason": "the Hugging Face hub is not reachable from this host"},
     "the model download failed: the Hugging Face hub is not reachable from this host"),
    ({"state": "ready"}, "vLLM did not accept the connection"),
    (None, "vLLM did not accept the connection"),  # no download step (or its file unreadable)
])
def test_vllm_not_there_yet_says_what_the_model_download_says(make_app, tmp_path, status, reason):
    status_file = tmp_path / "model.json"
    if status is not None:
        status_file.write_text(json.dumps(status))
    app = make_app(VLLM_URL=closed_port_url(), DCE_MODEL_STATUS_FILE=str(status_file))
    for response in (app.test_client().post("/api/dce/proxy", json=DCE_EXTENSION_BODY, headers=AUTH),
                     app.test_client().get("/readyz")):
        error = assert_error(response, 503)
        assert reason in error["message"] and response.headers["Retry-After"], error


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_later_than_its_timeout_is_504(make_app, fake_vllm, stream):
    c = make_app(DCE_FIRST_BYTE_TIMEOUT="1", DCE_ANSWER_TIMEOUT="1").test_client()
    c.get("/readyz")  # let the proxy learn the model before the fake turns slow
    fake_vllm.header_delay = 3
    r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": stream}, headers=AUTH)
    assert_error(r, 504)


def test_a_whole_answer_may_take_longer_than_the_first_byte_timeout(make_app, fake_vllm):
    # vLLM sends a non-streamed answer only when it is complete: the first byte is the last one, so
    # DCE_FIRST_BYTE_TIMEOUT would cut every long generation (issue 12). It gets DCE_ANSWER_TIMEOUT.
    c = make_app(DCE_FIRST_BYTE_TIMEOUT="1").test_client()
    c.get("/readyz")
    fake_vllm.header_delay = 2
    r = c.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=AUTH)
    assert r.status_code == 200, r.data


@pytest.mark.parametrize("route, body", GENERATION)
def test_garbage_body_is_502(client, fake_vllm, route, body):
    client.get("/readyz")
    fake_vllm.fault = "garbage"
    assert_error(client.post(route, json=body, headers=AUTH), 502)


@pytest.mark.parametrize("route, body", GENERATION)
def test_truncated_body_is_502_or_503_or_visibly_cut(client, fake_vllm, route, body):
    client.get("/readyz")
    fake_vllm.fault = "truncate"
    r = client.post(route, json=body, headers=AUTH)
    if route in PASSED_THROUGH:
        # Its bytes went on as they came (issue 12): the cut reaches the client (test_server.py).
        with pytest.raises(UpstreamStreamError):
            r.get_data()
        return
    assert r.status_code in (502, 503)
    assert_error(r, r.status_code)


@pytest.mark.parametrize("route", PASSED_THROUGH)
def test_a_whole_answer_passes_through_byte_for_byte_and_its_usage_is_logged(make_app, fake_vllm, route):
    with access_lines() as lines:
        r = make_app().test_client().post(route, json=dict(GENERATION)[route], headers=AUTH)
        r.close()  # the access line is written when the response closes
    (sent,) = [rec.response_body for rec in fake_vllm.requests if rec.path == route]  # what vLLM answered
    assert r.status_code == 200 and r.data == sent
    usage = json.loads(sent)["usage"]
    (line,) = lines
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])


def stream_ending_with_error(client, route, body):
    """POST a stream; return its events, asserting it ends with exactly one error event, then (on
    /api/dce/proxy, whose error shows as text) the tab's final chunk, then [DONE]."""
    r = client.post(route, json={**body, "stream": True}, headers=AUTH)
    assert r.status_code == 200
    data = sse_events(r.get_data())
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1, data[-3:]
    events = [json.loads(d) for d in data[:-1]]
    with_error = [i for i, e in enumerate(events) if "error" in e]
    assert len(with_error) == 1, f"error events at {with_error} of {len(events)}"
    tail = 2 if route == "/api/dce/proxy" else 1
    assert with_error == [len(events) - tail], f"error event at {with_error} of {len(events)}"
    err = events[with_error[0]]["error"]
    assert isinstance(err["message"], str) and isinstance(err["type"], str) and "code" in err
    return events


# Which faults each route must survive mid-stream. Garbage: only routes that
# parse the events (pure pass-through relays bytes as they are). Stall: each
# costs DCE_FIRST_BYTE_TIMEOUT, so one route per relay kind.
MID_STREAM_FAULTS = [
    ("/v1/chat/completions", "truncate"), ("/v1/chat/completions", "stall"),
    ("/v1/completions", "truncate"),
    ("/api/dce/proxy", "truncate"), ("/api/dce/proxy", "garbage"),
    ("/api/dce/generate", "truncate"), ("/api/dce/generate", "garbage"), ("/api/dce/generate", "stall"),
]


@pytest.mark.parametrize("route, fault", MID_STREAM_FAULTS)
def test_mid_stream_failure_ends_with_an_error_event_then_done(make_app, fake_vllm, route, fault):
    body = dict(GENERATION)[route]
    c = make_app(DCE_FIRST_BYTE_TIMEOUT="1").test_client()
    c.get("/readyz")
    fake_vllm.n_chunks, fake_vllm.fault, fake_vllm.fault_after, fake_vllm.stall_seconds = 5, fault, 2, 2.5
    events = stream_ending_with_error(c, route, body)
    assert len(events) >= 3, "the chunks before the failure were not relayed"


def test_a_stream_that_keeps_producing_is_never_cut(make_app, fake_vllm):
    # DCE_FIRST_BYTE_TIMEOUT bounds the wait for each chunk, not the whole stream.
    c = make_app(DCE_FIRST_BYTE_TIMEOUT="1").test_client()
    fake_vllm.n_chunks, fake_vllm.chunk_interval = 8, 0.15  # ~1.5 s in total
    r = c.post("/api/dce/proxy", json=DCE_EXTENSION_BODY, headers=AUTH)
    assert read_extension_body(r.get_data()).shown == (fake_vllm.expected_text(0), "stop")


VLLM_400 = {"error": {"message": "This model's maximum context length is 4096 tokens. However, your prompt "
                                 "contains at least 4097 input tokens, ...", "type": "BadRequestError",
                      "param": "input_tokens", "code": 400}}
VLLM_404 = {"error": {"message": "The model `gpt-4o` does not exist. Valid aliases: tiny.",
                      "type": "NotFoundError", "param": "model", "code": 404}}


@pytest.mark.parametrize("status, payload", [(400, VLLM_400), (404, VLLM_404)])
@pytest.mark.parametrize("route, body", GENERATION)
@pytest.mark.parametrize("stream", [False, True])
def test_vllm_errors_pass_through_with_status_and_body(client, fake_vllm, route, body, status, payload, stream):
    client.get("/readyz")
    fake_vllm.force_error = (status, payload)
    r = client.post(route, json={**body, "stream": stream}, headers=AUTH)
    assert r.status_code == status
    assert r.get_json() == payload


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_vllm_dropped_without_answer_is_sent_once_more(client, fake_vllm, stream):
    # A pooled connection vLLM had already closed (it drops idle ones after 5 s) gets no answer.
    fake_vllm.hang_up_requests = 1
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": stream},
                    headers=AUTH)
    assert r.status_code == 200, r.get_data()
    assert (b"data: [DONE]" in r.get_data()) == stream
    assert len(fake_vllm.generation_requests) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_dropping_the_resent_request_too_is_a_503(client, fake_vllm, stream):
    fake_vllm.hang_up_requests = 2
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": stream},
                    headers=AUTH)
    assert_error(r, 503, "upstream_unavailable")
    assert len(fake_vllm.generation_requests) == 2


def test_connections_to_vllm_are_probed_so_a_vanished_vllm_is_noticed(make_app, fake_vllm):
    # A vLLM whose host vanished never closes its connections: only TCP keep-alive probes end a
    # stream that would otherwise wait out DCE_FIRST_BYTE_TIMEOUT, its client kept by heartbeats.
    app = make_app()
    r = app.test_client().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                               headers=AUTH)
    assert r.status_code == 200
    (connection,) = list(app.extensions["dce_upstream"]._pool.pool.queue)[-1:]
    sock = connection.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) * sock.getsockopt(socket.IPPROTO_TCP,
                                                                                          socket.TCP_KEEPCNT)
    assert idle + probes <= 30, (idle, probes)


def test_a_model_list_cut_by_vllm_is_a_503_and_a_starting_worker_lives_on(caplog):
    # A worker reads the list as it starts (gunicorn.conf.py's post_worker_init): anything but an
    # ApiError there would stop the whole server.
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"data\":"
    for ask in ("learn_models", "models"):
        with vllm_answering_once(cut) as url:
            upstream = Upstream(load_settings({"DCE_API_KEYS": "alice:" + "a" * 32, "VLLM_URL": url}))
            if ask == "learn_models":
                upstream.learn_models()
                assert "model list is not known yet" in caplog.text
            else:
                with pytest.raises(ApiError) as raised:
                    upstream.models()
                assert raised.value.status == 503
