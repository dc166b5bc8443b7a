"""Issue 17's routes against the FAKE vLLM: the Responses API (whole and streamed: bytes passed on,
usage, limits, metrics, a cut stream's visible error), the utility routes, what stays 404, and CORS."""

from __future__ import annotations

import json
import threading

import pytest
import requests

from dce_proxy.record import RequestRecord
from dce_proxy.response_events import ResponseEventsRelay
from fake_responses import PROMPT_TOKENS, RESPONSE_ID
from test_metrics import requests_counted, scrape, value
from unit_helpers import ALICE_KEY, access_lines, assert_error, bearer
from wire import parse_sse, wait_until

AUTH = bearer(ALICE_KEY)
RESPONSE = {"model": "local-model", "input": "Summarise the selected files."}
ORIGIN = "https://chat.example.com"


def test_a_response_is_passed_on_with_its_model_mapped_and_its_budget_fitted(client, fake_vllm):
    with access_lines() as lines:
        r = client.post("/v1/responses", json={**RESPONSE, "max_output_tokens": 10**6}, headers=AUTH)
        body = r.get_data()
        r.close()
    assert r.status_code == 200
    sent = fake_vllm.generation_requests[-1].json
    assert sent["model"] == fake_vllm.model_ids[0]
    assert sent["max_output_tokens"] == fake_vllm.max_model_len
    assert body == bytes(fake_vllm.generation_requests[-1].response_body)  # untouched
    (line,) = lines
    assert (line["prompt_tokens"], line["completion_tokens"], line["tokens_exact"]) == \
        (PROMPT_TOKENS, fake_vllm.n_chunks, True)


def test_a_response_stream_is_passed_on_byte_for_byte_and_counted(client, fake_vllm):
    with access_lines() as lines:
        r = client.post("/v1/responses", json={**RESPONSE, "stream": True}, headers=AUTH)
        body = r.get_data()
        r.close()
    assert r.mimetype == "text/event-stream"
    sent = fake_vllm.generation_requests[-1]
    assert "stream_options" not in sent.json  # not a field of the Responses API
    assert body == bytes(sent.response_body)
    assert b"[DONE]" not in body
    (line,) = lines
    assert line["outcome"] == "done" and line["ttft_ms"] is not None
    assert (line["prompt_tokens"], line["completion_tokens"], line["tokens_exact"]) == \
        (PROMPT_TOKENS, fake_vllm.n_chunks, True)


def test_a_cut_response_stream_ends_with_an_error_event_the_sdks_raise_on(client, fake_vllm):
    fake_vllm.fault, fake_vllm.fault_after = "truncate", 2
    with access_lines() as lines:
        r = client.post("/v1/responses", json={**RESPONSE, "stream": True}, headers=AUTH)
        body = r.get_data()
        r.close()
    last = body.rstrip(b"\n").rpartition(b"\n\n")[2]
    assert last.startswith(b"event: error\ndata: ")
    error = json.loads(parse_sse(last).events[0])
    assert error["type"] == "error" and error["code"] == "upstream_unavailable" and error["message"]
    assert error["error"]["code"] == "upstream_unavailable"  # what the OpenAI SDKs raise an APIError on
    assert b"[DONE]" not in body and b"response.output_text.delta" in body
    assert lines[0]["outcome"] == "upstream_error"


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "input"), ({"input": []}, "input"), ({"input": 3}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"), ({"input": "x", "stream": "yes"}, "stream"),
    ({"input": "x", "model": 7}, "model"),
])
def test_a_bad_response_request_is_refused_before_vllm(client, fake_vllm, body, param):
    assert_error(client.post("/v1/responses", json=body, headers=AUTH), 422, param=param)
    assert fake_vllm.generation_requests == []


def test_a_response_holds_a_generation_slot(make_app, fake_vllm):
    client = make_app(DCE_MAX_CONCURRENT="1").test_client()
    fake_vllm.fault, fake_vllm.fault_after = "stall", 1
    fake_vllm.hold_stream = gate = threading.Event()
    held = client.post("/v1/responses", json={**RESPONSE, "stream": True}, headers=AUTH)
    wait_until(lambda: fake_vllm.open_streams == 1, 10, "the first response to stream")
    assert_error(client.post("/v1/responses", json=RESPONSE, headers=AUTH), 429, "rate_limit_error")
    gate.set()
    held.get_data()
    held.close()
    assert client.post("/v1/responses", json=RESPONSE, headers=AUTH).status_code == 200  # freed


def test_the_utility_routes_count_against_the_rate_limit(make_app, fake_vllm):
    client = make_app(DCE_RATE_LIMIT="2/minute").test_client()
    assert client.post("/tokenize", json={"prompt": "hi"}, headers=AUTH).status_code == 200
    assert client.get("/v1/responses/resp_1", headers=AUTH).status_code == 404  # vLLM's store is off
    assert_error(client.post("/tokenize", json={"prompt": "hi"}, headers=AUTH), 429, "rate_limit_error")


def test_the_new_routes_are_in_the_metrics(proxy_server, fake_vllm):
    server = proxy_server()
    for stream in (False, True):
        requests.post(f"{server.url}/v1/responses", json={**RESPONSE, "stream": stream}, headers=AUTH,
                      timeout=10).content
    requests.post(f"{server.url}/tokenize", json={"prompt": "hi"}, headers=AUTH, timeout=10)
    wait_until(lambda: requests_counted(server, "alice", "/v1/responses", 200) == 2, 10, "both responses counted")
    samples = scrape(server)
    assert value(samples, "dce_proxy_requests_total", key="alice", route="/tokenize", status="200") == 1
    assert value(samples, "dce_proxy_tokens_total", key="alice", type="completion") == 2 * fake_vllm.n_chunks


def test_tokenize_passes_on_vllms_answer_with_the_model_mapped(client, fake_vllm):
    r = client.post("/tokenize", json={"model": "local-model", "prompt": "hi"}, headers=AUTH)
    assert r.status_code == 200 and r.get_json()["tokens"] == [1, 2, 3]
    assert fake_vllm.requests[-1].json["model"] == fake_vllm.model_ids[0]
    assert_error(client.post("/detokenize", json={"tokens": ["a"]}, headers=AUTH), 422, param="tokens")


def test_embeddings_for_a_chat_model_are_a_clear_404(client, fake_vllm):
    error = assert_error(client.post("/v1/embeddings", json={"input": "hi"}, headers=AUTH), 404)
    assert error["code"] == "unsupported_by_model"


@pytest.mark.parametrize("response_id", ["a%3Fb", "..", "%2E%2E", "a.b", "a%23b"])
def test_a_response_id_cannot_change_the_path_sent_on(client, fake_vllm, response_id):
    assert_error(client.get(f"/v1/responses/{response_id}", headers=AUTH), 422, param="response_id")
    assert_error(client.post(f"/v1/responses/{response_id}/cancel", headers=AUTH), 422, param="response_id")
    assert fake_vllm.requests == []


def test_a_response_in_the_background_is_refused(client, fake_vllm):
    # vLLM would run it on after its request, and so after its generation slot, ended.
    assert_error(client.post("/v1/responses", json={**RESPONSE, "background": True}, headers=AUTH), 422,
                 param="background")
    assert fake_vllm.generation_requests == []


def test_vllms_error_event_ends_a_response_stream_without_another(fake_vllm):
    relay = ResponseEventsRelay(RequestRecord("r"))
    failure = b'event: error\ndata: {"type":"error","code":"x","message":"engine died","sequence_number":3}\n\n'
    assert relay.feed(failure) == failure
    assert relay.end() == b"" and relay.failed


def test_a_stored_response_is_never_replayed_as_a_stream(client, fake_vllm):
    assert_error(client.get(f"/v1/responses/{RESPONSE_ID}?stream=true", headers=AUTH), 422, param="stream")


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/reset_prefix_cache", "/sleep", "/collective_rpc",
                                  "/pooling", "/v1/audio/transcriptions", "/invocations", "/start_profile"])
def test_vllms_operator_routes_are_not_served(client, fake_vllm, path):
    assert_error(client.post(path, json={}, headers=AUTH), 404)
    assert fake_vllm.requests == []


# -- CORS --------------------------------------------------------------------------------------

def preflight(client, origin: str):
    return client.options("/v1/responses", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization,content-type"})


def test_a_preflight_from_a_listed_origin_passes_without_a_key(make_app, fake_vllm):
    r = preflight(make_app(DCE_CORS_ORIGINS=f"{ORIGIN}, http://localhost:3000").test_client(), ORIGIN)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()


@pytest.mark.parametrize("origin", ["https://evil.example", "https://chat.example.com.evil.example",
                                    "http://chat.example.com", "http://1:3000"])
def test_a_preflight_from_another_origin_gets_no_cors_headers(make_app, fake_vllm, origin):
    r = preflight(make_app(DCE_CORS_ORIGINS=f"{ORIGIN},http://[::1]:3000").test_client(), origin)
    assert "Access-Control-Allow-Origin" not in r.headers


def test_an_ipv6_origin_is_matched_exactly(make_app, fake_vllm):
    r = preflight(make_app(DCE_CORS_ORIGINS="http://[::1]:3000").test_client(), "http://[::1]:3000")
    assert r.headers["Access-Control-Allow-Origin"] == "http://[::1]:3000"


def test_a_client_without_an_origin_is_not_told_the_trusted_pages(make_app, fake_vllm):
    r = make_app(DCE_CORS_ORIGINS=ORIGIN).test_client().post("/v1/responses", json=RESPONSE, headers=AUTH)
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_cors_is_off_by_default(client, fake_vllm):
    r = preflight(client, ORIGIN)
    assert r.status_code == 401 and "Access-Control-Allow-Origin" not in r.headers


def test_a_listed_origin_reads_answers_and_errors_but_still_needs_the_key(make_app, fake_vllm):
    client = make_app(DCE_CORS_ORIGINS=ORIGIN).test_client()
    refused = client.post("/v1/responses", json=RESPONSE, headers={"Origin": ORIGIN})
    assert_error(refused, 401)
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    served = client.post("/v1/responses", json=RESPONSE, headers={"Origin": ORIGIN, **AUTH})
    assert served.status_code == 200 and served.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in served.headers["Vary"]  # a shared cache must not serve it to another page
    assert "Retry-After" in served.headers["Access-Control-Expose-Headers"]


def test_only_vllms_own_no_such_route_is_a_404_unsupported_by_model(client, fake_vllm):
    fake_vllm.force_error = (404, "no such thing")  # another 404 without vLLM's JSON error: garbage, as before
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert assert_error(client.post("/v1/chat/completions", json=chat, headers=AUTH), 502)["code"] == \
        "bad_upstream_response"
