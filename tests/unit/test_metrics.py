"""Issue 13: exact usage per request (vLLM's own counts, also for streams) and the Prometheus
metrics, read from the metrics port of a real gunicorn as Prometheus reads them."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dce_proxy.report import format_table, usage_by_key

from unit_helpers import (ALICE_KEY, DCE_EXTENSION_BODY, Tab, access_lines, bearer, raw_http,
                          read_events_then_hang_up, sse_json)
from wire import extension_body, post_like_extension, wait_until

AUTH = bearer(ALICE_KEY)
PROXY = "/api/dce/proxy"
CHAT = {"model": "local-model", "messages": [{"role": "user", "content": "hi"}]}
STREAMS = {
    "/v1/chat/completions": {**CHAT, "stream": True, "n": 2},
    "/v1/completions": {"model": "local-model", "prompt": "hi", "stream": True, "n": 2},
    PROXY: DCE_EXTENSION_BODY,
    "/api/dce/generate": {"prompt": "hi", "n": 2, "stream": True},
}


def scrape(server) -> dict:
    text = requests.get(server.metrics_url, timeout=5).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_counted(server, key: str, route: str, status: int) -> float:
    return value(scrape(server), "dce_proxy_requests_total", key=key, route=route, status=str(status))


@pytest.mark.parametrize("route, asked", [
    ("/v1/chat/completions", False), ("/v1/chat/completions", True), ("/v1/completions", False),
    ("/v1/completions", True), (PROXY, False), (PROXY, True), ("/api/dce/generate", False),
])
def test_a_streams_usage_is_vllms_own_and_reaches_only_a_client_that_asked(client, fake_vllm, route, asked):
    body = {**STREAMS[route], **({"stream_options": {"include_usage": True}} if asked else {})}
    with access_lines() as lines:
        r = client.post(route, json=body, headers=AUTH)
        received = r.get_data()
        r.close()
    sent = fake_vllm.generation_requests[-1]
    assert sent.json["stream_options"]["include_usage"] is True  # every stream asks vLLM
    usage = sse_json(bytes(sent.response_body))[-1]["usage"]
    (line,) = lines
    assert (line["prompt_tokens"], line["completion_tokens"], line["tokens_exact"]) == \
        (usage["prompt_tokens"], usage["completion_tokens"], True)
    assert line["outcome"] == "done" and line["ttft_ms"] <= line["latency_ms"]
    assert (b'"usage"' in received) == asked


def test_a_client_that_asks_for_usage_in_a_wrong_shape_gets_a_clear_error(client, fake_vllm):
    for options in ("yes", {"include_usage": "yes"}):
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": options},
                        headers=AUTH)
        assert r.status_code == 422 and r.get_json()["error"]["param"] == "stream_options"
    assert not fake_vllm.generation_requests


@pytest.mark.parametrize("route, options, to_vllm, usage_sent", [
    # As vLLM reads stream_options: an object asks for usage unless include_usage is false.
    ("/v1/chat/completions", None, {"include_usage": True}, False),
    ("/v1/chat/completions", {}, {"include_usage": True}, True),
    ("/v1/chat/completions", {"include_usage": False, "continuous_usage_stats": True},
     {"include_usage": True, "continuous_usage_stats": False}, False),
    ("/v1/chat/completions", {"continuous_usage_stats": True}, {"include_usage": True, "continuous_usage_stats": True}, True),
    # The extension's route asks for usage in every event (a stream cut early keeps vLLM's prompt count).
    (PROXY, None, {"include_usage": True, "continuous_usage_stats": True}, False),
])
def test_stream_options_ask_vllm_for_usage_and_the_client_gets_what_it_asked(client, fake_vllm, route, options,
                                                                             to_vllm, usage_sent):
    body = {**STREAMS[route], **({} if options is None else {"stream_options": options})}
    received = client.post(route, json=body, headers=AUTH).get_data()
    assert fake_vllm.last_body["stream_options"] == to_vllm
    assert (b'"usage"' in received) == usage_sent


def test_each_way_a_stream_ends_is_counted_with_its_tokens(proxy_server, fake_vllm):
    server = proxy_server(DCE_HEARTBEAT_SECONDS="0.2", DCE_FIRST_BYTE_TIMEOUT="1")
    url = f"{server.url}/k/{ALICE_KEY}{PROXY}"
    body = extension_body("x")
    session = requests.Session()
    assert post_like_extension(session, url, body).finish_reason == "stop"  # done: 3 tokens
    fake_vllm.fault = "error"  # vLLM's error event after 1 token
    assert post_like_extension(session, url, body).finish_reason == "error"
    fake_vllm.fault, fake_vllm.hold_headers = None, threading.Event()  # vLLM silent: 0 tokens
    assert post_like_extension(session, url, body).finish_reason == "error"
    fake_vllm.hold_headers.set()
    fake_vllm.fault = "error"  # on /v1 too, though vLLM's [DONE] follows its error event
    assert b'"error"' in session.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True},
                                      headers=AUTH, timeout=10).content
    fake_vllm.fault, fake_vllm.hold_stream = "stall", threading.Event()  # the client leaves after 1 token
    sock = raw_http(server.port, "POST", f"/k/{ALICE_KEY}{PROXY}", json.dumps(body).encode(),
                    [("Content-Type", "application/json")])
    read_events_then_hang_up(sock, 2)  # the role chunk, then one token
    assert requests.post(f"{server.url}{PROXY}", json=body, timeout=5).status_code == 401
    wait_until(lambda: requests_counted(server, "alice", PROXY, 200) == 4, 10, "four streams counted")
    fake_vllm.hold_stream.set()

    wait_until(lambda: requests_counted(server, "alice", "/v1/chat/completions", 200) == 1, 10, "the /v1 stream counted")
    samples = scrape(server)
    for outcome in ("done", "upstream_error", "timeout", "client_gone"):
        assert value(samples, "dce_proxy_stream_outcomes_total", key="alice", route=PROXY, outcome=outcome) == 1, outcome
    assert value(samples, "dce_proxy_stream_outcomes_total", key="alice", route="/v1/chat/completions",
                 outcome="upstream_error") == 1
    assert value(samples, "dce_proxy_requests_total", key="none", route=PROXY, status="401") == 1
    assert value(samples, "dce_proxy_tokens_total", key="alice", type="completion") == 3 + 1 + 0 + 1 + 1
    assert value(samples, "dce_proxy_tokens_total", key="alice", type="prompt") == 3 * 7  # vLLM's usage, in every
    # event of the streams that began (asked by the proxy): the one its client left is counted too
    # Three streams had a first token; all four took time.
    assert value(samples, "dce_proxy_time_to_first_token_seconds_count", key="alice", route=PROXY) == 3
    assert value(samples, "dce_proxy_request_duration_seconds_count", key="alice", route=PROXY) == 4
    text = requests.get(server.metrics_url, timeout=5).text
    assert ALICE_KEY not in text  # key names, never keys
    # `make usage`: the three streams that ended on an error are the key's errors, the 401 is none's.
    usage = usage_by_key(text)
    assert usage == {"alice": {"requests": 5, "errors": 3, "prompt tokens": 3 * 7, "completion tokens": 6},
                     "none": {"requests": 1, "errors": 1, "prompt tokens": 0, "completion tokens": 0}}
    assert format_table(usage).splitlines() == [
        "key    requests  errors  prompt tokens  completion tokens",
        "alice         5       3             21                  6",
        "none          1       1              0                  0"]


def test_streams_in_flight_and_waiting_in_line_are_gauges(proxy_server, fake_vllm):
    server = proxy_server(DCE_MAX_CONCURRENT="1", DCE_HEARTBEAT_SECONDS="0.2")
    fake_vllm.fault, fake_vllm.hold_stream = "stall", threading.Event()
    url = f"{server.url}/k/{ALICE_KEY}{PROXY}"
    first = Tab(url, "A")
    wait_until(lambda: first.progress.content, 5, "tab A's first token")
    waiting = Tab(url, "B")
    wait_until(lambda: waiting.progress.heartbeats, 5, "tab B in line")

    def gauges() -> tuple[float, float]:
        samples = scrape(server)
        return (value(samples, "dce_proxy_streams_in_flight", key="alice"),
                value(samples, "dce_proxy_queue_waiting", key="alice"))

    assert gauges() == (1, 1)
    fake_vllm.hold_stream.set()
    assert first.join().finish_reason == "stop" and waiting.join().finish_reason == "stop"
    wait_until(lambda: gauges() == (0, 0), 5, "both gauges back to 0", interval=0.1)


def _workers(server) -> set[int]:
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as children:
        return {int(pid) for pid in children.read().split()}


def _worker_of(server, request_id: str) -> int | None:
    """The pid in the request's access line, once written (when its response closed)."""
    return next((json.loads(line)["worker"] for line in server.logs().splitlines() if request_id in line), None)


def test_two_workers_add_up_and_a_replaced_worker_keeps_its_counts(proxy_server, fake_vllm):
    server = proxy_server(gunicorn_args=("--workers", "2"))
    wait_until(lambda: len(_workers(server)) == 2, 10, "two workers")
    served_by: set[int] = set()
    sent = 0
    while len(served_by) < 2:  # new connections, until the kernel gave some to each worker
        assert sent < 400, f"every request went to one worker: {served_by}"
        answer = requests.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=5)
        assert answer.status_code == 200
        served_by.add(wait_until(lambda: _worker_of(server, answer.headers["X-Request-Id"]), 5, "its access line"))
        sent += 1
    wait_until(lambda: requests_counted(server, "alice", "/v1/chat/completions", 200) == sent, 10,
               f"{sent} requests counted across both workers")
    tokens = value(scrape(server), "dce_proxy_tokens_total", key="alice", type="completion")
    assert tokens == sent * fake_vllm.n_chunks

    replaced = served_by.pop()
    os.kill(replaced, signal.SIGKILL)
    wait_until(lambda: replaced not in _workers(server) and len(_workers(server)) == 2, 10, "a new worker")
    assert requests_counted(server, "alice", "/v1/chat/completions", 200) == sent  # the dead worker's too
    assert requests.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=5).status_code == 200
    wait_until(lambda: requests_counted(server, "alice", "/v1/chat/completions", 200) == sent + 1, 10,
               "the next request counted on top")
