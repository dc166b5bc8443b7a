"""Over the key's in-flight cap, /api/dce/proxy streams wait in line (first come, first served, with
heartbeats) instead of failing; a client that leaves the line leaves at once; /v1 and generate keep
the 429. Real gunicorn + gevent, cap 1; the first tab holds the slot until the test lets it go."""

import json
import threading

import pytest
import requests

from dce_proxy.slots import LocalSlots
from unit_helpers import ALICE_KEY, BOB_KEY, Tab, assert_error, bearer, raw_http
from wire import extension_body, wait_until

BEAT = b": keep-alive\n\n"


def prompts_sent(fake):
    return [request.json["messages"][0]["content"] for request in fake.generation_requests]


@pytest.fixture
def held(proxy_server, fake_vllm):
    """A server with a cap of 1, and tab "A" holding the slot (its stream paused after one token)."""
    server = proxy_server(DCE_MAX_CONCURRENT="1", DCE_HEARTBEAT_SECONDS="0.2", DCE_QUEUE_TIMEOUT="20")
    fake_vllm.fault, fake_vllm.fault_after = "stall", 1
    fake_vllm.hold_stream = threading.Event()
    server.extension_url = f"{server.url}/k/{ALICE_KEY}/api/dce/proxy"
    first = Tab(server.extension_url, "A")
    wait_until(lambda: first.progress.content, 5, "tab A's first token")
    server.first = first
    return server


def queue_tab(server, prompt) -> Tab:
    tab = Tab(server.extension_url, prompt)
    wait_until(lambda: tab.progress.heartbeats, 5, f"tab {prompt} in line (its first heartbeat)")
    return tab


def test_tabs_over_the_cap_wait_and_run_in_arrival_order(held, fake_vllm):
    waiting = [queue_tab(held, prompt) for prompt in "BCD"]
    assert prompts_sent(fake_vllm) == ["A"]
    wait_until(lambda: all(tab.progress.heartbeats >= 3 for tab in waiting), 5, "heartbeats while in line")
    fake_vllm.hold_stream.set()
    for tab in [held.first, *waiting]:
        assert tab.join().shown == (fake_vllm.expected_text(0), "stop"), tab.prompt
    assert prompts_sent(fake_vllm) == ["A", "B", "C", "D"]


def test_a_tab_that_closes_while_in_line_leaves_it_at_once(held, fake_vllm):
    body = json.dumps(extension_body("B")).encode()
    sock = raw_http(held.port, "POST", f"/k/{ALICE_KEY}/api/dce/proxy", body,
                    [("Content-Type", "application/json"), ("X-Request-Id", "tab-b-in-line")])
    got = b""
    while BEAT not in got:
        got += sock.recv(65536)
    later = queue_tab(held, "C")
    sock.close()
    # Its access-log line is written when its response closes: it left the line, A still streaming.
    wait_until(lambda: "tab-b-in-line" in held.logs(), 5, "tab B's response to close")
    fake_vllm.hold_stream.set()
    assert later.join().shown == (fake_vllm.expected_text(0), "stop")
    assert prompts_sent(fake_vllm) == ["A", "C"]


def test_a_tab_that_waits_too_long_sees_why(proxy_server, fake_vllm):
    server = proxy_server(DCE_MAX_CONCURRENT="1", DCE_HEARTBEAT_SECONDS="0.2", DCE_QUEUE_TIMEOUT="0.5")
    fake_vllm.fault, fake_vllm.fault_after, fake_vllm.hold_stream = "stall", 1, threading.Event()
    url = f"{server.url}/k/{ALICE_KEY}/api/dce/proxy"
    first = Tab(url, "A")
    wait_until(lambda: first.progress.content, 5, "tab A's first token")
    late = Tab(url, "B").join()
    assert late.status == 200 and late.heartbeats >= 1 and late.saw_done
    assert late.content.startswith("\n\n[DCE proxy error: No generation slot came free")
    assert late.finish_reason == "error"
    fake_vllm.hold_stream.set()
    assert first.join().finish_reason == "stop"
    assert prompts_sent(fake_vllm) == ["A"]


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
    ("/v1/completions", {"prompt": "x", "stream": True}),
    ("/api/dce/generate", {"prompt": "x", "n": 1, "stream": True}),
    ("/api/dce/proxy", {**extension_body("x"), "stream": False}),  # only a stream can wait
])
def test_other_routes_over_the_cap_still_get_429(held, fake_vllm, route, body):
    r = requests.post(held.url + route, json=body, headers=bearer(ALICE_KEY), timeout=10)
    assert_error(r, 429, type_="rate_limit_error")
    assert int(r.headers["Retry-After"]) >= 1
    other = requests.post(held.url + route, json={**body, "stream": False}, headers=bearer(BOB_KEY), timeout=10)
    assert other.status_code == 200, "another key is not held up by alice's line"
    fake_vllm.hold_stream.set()
    assert held.first.join().finish_reason == "stop"


def test_local_slots_serve_their_line_first_come_first_served():
    slots = LocalSlots()
    first = slots.acquire("alice", 1)
    b, c, d = (slots.join("alice", 1) for _ in range(3))
    assert slots.acquire("bob", 1) is not None, "another client has its own cap"
    assert b.wait(0) is None
    first()
    assert slots.acquire("alice", 1) is None, "a newcomer may not pass the line"
    assert c.wait(0) is None, "not c's turn"
    release_b = b.wait(0)
    assert release_b is not None
    c.leave()  # c's client went away
    release_b()
    assert d.wait(0) is not None
