"""Behaviour only the real server shows (gunicorn + gevent, proxy/gunicorn.conf.py):
chunks relayed as they arrive, client disconnects propagated upstream,
concurrency caps across simultaneous requests, and what the logs hold."""

import hashlib
import json
import statistics
import threading
import time
import uuid

import pytest
import requests

from unit_helpers import ALICE_KEY, BOB_KEY, DCE_EXTENSION_BODY, basic, bearer, raw_http, \
    read_events_then_hang_up, sse_json, timed_events
from wire import read_extension_body

STREAMS = {
    "/api/dce/proxy": DCE_EXTENSION_BODY,
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    "/api/dce/generate": {"prompt": "hi", "n": 1, "stream": True},
}


def content_events(events):
    """Arrival times of the events that carry generated text."""
    times = []
    for at, data in events:
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        text = obj.get("text") or "".join((c.get("delta") or {}).get("content") or "" for c in obj.get("choices", []))
        if text:
            times.append(at)
    return times


@pytest.mark.parametrize("route", list(STREAMS))
def test_chunks_are_relayed_as_they_arrive_not_coalesced(default_proxy_server, fake_vllm, route):
    fake_vllm.n_chunks, fake_vllm.chunk_interval = 8, 0.15
    start = time.monotonic()
    with requests.post(f"{default_proxy_server.url}/k/{ALICE_KEY}{route}", json=STREAMS[route],
                       stream=True, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = timed_events(r)
    end = time.monotonic()
    times = content_events(events)
    assert len(times) == 8
    gaps = [b - a for a, b in zip(times, times[1:])]
    # The fake spaces chunks 150 ms apart; relayed as they come, they arrive
    # spread the same way. Buffered, they would land together at the end.
    assert times[0] - start < (end - start) - 0.7, "first chunk arrived only near the end"
    assert times[-1] - times[0] > 0.8
    assert statistics.median(gaps) > 0.1, gaps
    # One hiccup of the machine may bunch two chunks; more would be buffering.
    assert sum(gap > 0.075 for gap in gaps) >= len(gaps) - 2, gaps


def test_extension_request_through_the_real_server(default_proxy_server, fake_vllm):
    r = requests.post(f"{default_proxy_server.url}/k/{ALICE_KEY}/api/dce/proxy", data=json.dumps(DCE_EXTENSION_BODY),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 200
    assert read_extension_body(r.content).shown == (fake_vllm.expected_text(0), "stop")


def test_client_disconnect_closes_upstream_and_frees_the_slot(proxy_server, fake_vllm):
    server = proxy_server(DCE_MAX_CONCURRENT="1")
    fake_vllm.n_chunks, fake_vllm.chunk_interval = 300, 0.05  # a 15 s stream unless cut
    for route, body in STREAMS.items():
        fake_vllm.disconnected.clear()
        sock = raw_http(server.port, "POST", f"/k/{ALICE_KEY}{route}", json.dumps(body).encode(),
                        [("Content-Type", "application/json")])
        got = read_events_then_hang_up(sock, 2)
        assert got.startswith(b"HTTP/1.1 200"), got[:100]
        assert fake_vllm.disconnected.wait(2), f"{route}: vLLM still streaming 2 s after the client left"
        assert fake_vllm.wait_for(lambda: fake_vllm.open_streams == 0, 1)
        # Cap 1: the next request is admitted only if the slot was released.
        assert fake_vllm.wait_for(lambda: requests.post(
            f"{server.url}/v1/completions", json={"prompt": "hi"}, headers=bearer(ALICE_KEY),
            timeout=5).status_code == 200, 1), f"{route}: concurrency slot not released"


def fire_at_once(url, count, headers, body):
    """`count` streaming requests released together; returns (status, Retry-After, body) each."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def one(i):
        barrier.wait()
        with requests.post(url, json=body, headers=headers, stream=True, timeout=15) as r:
            results[i] = (r.status_code, r.headers.get("Retry-After"), r.content)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads, results


def test_concurrency_cap_across_simultaneous_requests_is_per_key(proxy_server, fake_vllm):
    server = proxy_server(DCE_MAX_CONCURRENT="3")
    fake_vllm.n_chunks, fake_vllm.chunk_interval = 16, 0.1  # each admitted stream lasts ~2 s
    url = f"{server.url}/v1/chat/completions"
    body = STREAMS["/v1/chat/completions"]
    threads, results = fire_at_once(url, 9, bearer(ALICE_KEY), body)
    assert fake_vllm.wait_for(lambda: fake_vllm.open_streams == 3, 3)
    # Alice is at her cap; Bob is not affected by it.
    bob = requests.post(url, json={**body, "stream": False}, headers=bearer(BOB_KEY), timeout=10)
    assert bob.status_code == 200, bob.text
    for t in threads:
        t.join(15)
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 3 + [429] * 6
    for status, retry_after, content in results:
        if status == 429:
            assert retry_after and int(retry_after) >= 1
            assert json.loads(content)["error"]["type"] == "rate_limit_error"
        else:
            assert len(sse_json(content)) == 1 + 16
    # Streams that ended normally gave their slots back.
    again = requests.post(url, json={**body, "stream": False}, headers=bearer(ALICE_KEY), timeout=10)
    assert again.status_code == 200


def test_logs_hold_no_key_prompt_or_answer(proxy_server, fake_vllm):
    plain_key = "plain-key-" + uuid.uuid4().hex[:12]
    server = proxy_server(DCE_API_KEYS=f"alice:{ALICE_KEY},bob:{BOB_KEY},{plain_key}")
    prompt = "PROMPT-" + uuid.uuid4().hex
    fake_vllm.word = "ANSWER" + uuid.uuid4().hex[:8]
    wrong_key = "wrong-key-" + uuid.uuid4().hex[:12]
    chat = {"messages": [{"role": "user", "content": prompt}]}
    calls = [  # (path, headers, body): every auth form, stream and not, and failures
        (f"/k/{ALICE_KEY}/api/dce/proxy", {}, {**chat, "stream": True}),
        (f"/k/{ALICE_KEY}/api/dce/generate", {}, {"prompt": prompt, "n": 2}),
        ("/api/dce/generate", bearer(BOB_KEY), {"prompt": prompt, "n": 1, "stream": True}),
        ("/v1/chat/completions", {"X-API-Key": plain_key}, chat),
        ("/v1/completions", basic(ALICE_KEY), {"prompt": prompt}),
        (f"/k/{wrong_key}/api/dce/proxy", {}, chat),
        ("/api/dce/generate", bearer(ALICE_KEY), {"prompt": prompt, "n": 0}),
    ]
    responses = [requests.post(server.url + path, json=body, headers=headers, timeout=10)
                 for path, headers, body in calls]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 401, 422]
    assert all(fake_vllm.word in r.text for r in responses[:5]), "the answers did go through the proxy"
    request_ids = [r.headers.get("X-Request-Id") for r in responses]
    assert all(request_ids)
    time.sleep(0.3)  # the last lines are written as the responses close
    logs = server.logs()
    for secret in (ALICE_KEY, BOB_KEY, plain_key, wrong_key, prompt, fake_vllm.word):
        assert secret not in logs, f"{secret[:12]}... leaked into the logs"

    access = [json.loads(line) for line in logs.splitlines()
              if line.startswith("{") and "request_id" in json.loads(line)]
    by_id = {entry["request_id"]: entry for entry in access}
    assert set(request_ids) <= set(by_id), "a request has no access log line"
    for entry in access:
        assert {"request_id", "method", "route", "status", "latency_ms", "key_id", "stream"} <= set(entry), entry
        assert "/k/" not in str(entry["route"])
        assert isinstance(entry["latency_ms"], (int, float))
    logged = [by_id[rid] for rid in request_ids]
    assert [e["status"] for e in logged] == [r.status_code for r in responses]
    plain_id = "key-" + hashlib.sha256(plain_key.encode()).hexdigest()[:8]
    assert [e["key_id"] for e in logged[:5]] == ["alice", "alice", "bob", plain_id, "alice"]
    assert logged[0]["route"] == logged[5]["route"] == "/api/dce/proxy"
    assert [e["stream"] for e in logged[:5]] == [True, False, True, False, False]
    # Token counts are logged when vLLM reported them (fake: 7 prompt tokens, 3 per choice).
    assert (logged[1]["prompt_tokens"], logged[1]["completion_tokens"]) == (7, 6)


def test_a_stream_vllm_floods_does_not_hold_the_worker(default_proxy_server, fake_vllm):
    """vLLM producing faster than the worker relays (a fast GPU, busy cores): the worker's reads never
    wait, and without yielding on its own one stream would starve every other connection of the
    worker (and gunicorn's heartbeat, which kills it). Another request must be answered meanwhile."""
    fake_vllm.n_chunks = 60_000  # sent back to back, faster than the extension's route rewrites them
    sock = raw_http(default_proxy_server.port, "POST", "/api/dce/proxy", json.dumps(DCE_EXTENSION_BODY).encode(),
                    [("Authorization", f"Bearer {ALICE_KEY}"), ("Content-Type", "application/json")])
    finished = threading.Event()

    def drain():  # a client that reads as fast as it can, so that writes never wait either
        tail = b""
        with sock:
            while chunk := sock.recv(1 << 20):
                tail = (tail + chunk)[-64:]
                if b"[DONE]" in tail:
                    break
        finished.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    assert fake_vllm.wait_for(lambda: fake_vllm.open_streams == 1, 10)
    answer = requests.get(default_proxy_server.url + "/healthz", timeout=120)
    answered_while_streaming = not finished.is_set()
    reader.join(120)
    assert answer.status_code == 200
    assert finished.is_set(), "the flooded stream did not end"
    assert answered_while_streaming, "the worker answered nothing else until the flooded stream ended"


def test_gunicorns_own_error_log_never_shows_a_path_key(tmp_path):
    # gunicorn logs the target of a request whose response failed before its headers, /k/KEY and
    # all (issue 12): its config cuts the key, however spelled, and gunicorn's log set-up keeps that.
    import logging
    import runpy

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from conftest import PROXY_DIR
    runpy.run_path(str(PROXY_DIR / "gunicorn.conf.py"))
    Logger(Config())  # what gunicorn does next with its loggers
    error_log = logging.getLogger("gunicorn.error")
    for target in (f"/k/{ALICE_KEY}/v1/chat/completions", f"/%6B/{ALICE_KEY}/v1/models",
                   f"https://localhost/K%2F{ALICE_KEY}?x=1"):
        record = error_log.makeRecord("gunicorn.error", logging.ERROR, __file__, 1,
                                      "Error handling request %s %s", ("POST", target), None)
        assert all(f.filter(record) for f in error_log.filters)
        assert ALICE_KEY not in record.getMessage() and "/k/REDACTED" in record.getMessage(), record.getMessage()


def test_a_worker_gives_callbacks_50_ms_a_turn_of_its_loop(monkeypatch):
    # gevent bounds the callbacks it runs per turn (a new connection's handler starting) by the
    # interpreter's switch interval, 5 ms unless told: with a thousand streams, new ones waited turns.
    import runpy
    import sys

    from conftest import PROXY_DIR
    from gunicorn.workers import ggevent
    monkeypatch.setattr(ggevent, "StreamServer", ggevent.StreamServer)  # post_fork replaces it too
    before = sys.getswitchinterval()
    try:
        runpy.run_path(str(PROXY_DIR / "gunicorn.conf.py"))["post_fork"](None, None)
        assert sys.getswitchinterval() == pytest.approx(0.05)
    finally:
        sys.setswitchinterval(before)


def test_a_whole_answer_cut_by_vllm_reaches_the_client_as_cut_at_once(default_proxy_server, fake_vllm):
    # Passed through as it comes (issue 12), with vLLM's Content-Length: once vLLM hangs up halfway,
    # the client's connection must close too, not wait for the promised bytes until a keep-alive
    # timeout (75 s) ends it. The client's own timeout is far below that.
    fake_vllm.fault = "truncate"
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
        requests.post(f"{default_proxy_server.url}/k/{ALICE_KEY}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
