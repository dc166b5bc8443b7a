"""The fake vLLM itself: the other tests are only as good as its likeness to
vLLM 0.32 (shapes and error bodies from the shared measurements)."""

import json
import threading

import requests

from unit_helpers import raw_http, read_events_then_hang_up, sse_json
from wire import wait_until


def test_models_lists_the_served_model_with_max_model_len(fake_vllm):
    body = requests.get(fake_vllm.url + "/v1/models", timeout=5).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "tiny"
    assert body["data"][0]["max_model_len"] == 4096


def test_vllm_error_bodies_are_the_measured_ones(fake_vllm):
    r = requests.post(fake_vllm.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5000}, timeout=5)
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "max_tokens=5000 cannot be greater than max_model_len=4096. Please request fewer output "
                   "tokens. (parameter=max_tokens, value=5000)",
        "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    r = requests.post(fake_vllm.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, timeout=5)
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The model `gpt-4o` does not exist. Valid aliases: tiny."


def test_chat_stream_has_role_chunk_interleaved_indexes_and_done(fake_vllm):
    r = requests.post(fake_vllm.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "n": 3, "stream": True}, timeout=5)
    events = sse_json(r.content)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content_indexes = [e["choices"][0]["index"] for e in events if e["choices"][0]["delta"].get("content")]
    assert content_indexes[:6] == [0, 1, 2, 0, 1, 2]
    # vLLM 0.32: the last token rides with finish_reason; every other chunk says null explicitly.
    assert [e["choices"][0]["finish_reason"] for e in events[-3:]] == ["stop"] * 3
    assert [e["choices"][0]["delta"]["content"] for e in events[-3:]] == [f"tok{i}.2 " for i in range(3)]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-3])
    assert len(events) == 3 * (1 + 3)
    assert fake_vllm.wait_for(lambda: fake_vllm.streams_finished == 1 and fake_vllm.open_streams == 0, 1)


def test_fake_notices_a_client_that_hangs_up(fake_vllm):
    fake_vllm.n_chunks, fake_vllm.chunk_interval = 100, 0.05
    body = json.dumps({"prompt": "x", "stream": True}).encode()
    sock = raw_http(fake_vllm.port, "POST", "/v1/completions", body, [("Content-Type", "application/json")])
    got = read_events_then_hang_up(sock, 2)
    assert b"200 OK" in got
    assert fake_vllm.disconnected.wait(2)
    assert fake_vllm.wait_for(lambda: fake_vllm.open_streams == 0, 2)


def test_fake_records_request_bodies(fake_vllm):
    requests.post(fake_vllm.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
    assert fake_vllm.last_body == {"prompt": "x", "max_tokens": 2}
    assert json.loads(fake_vllm.requests[-1].response_body)["choices"][0]["finish_reason"] == "length"


def test_usage_chunk_only_when_asked(fake_vllm):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    plain = sse_json(requests.post(fake_vllm.url + "/v1/chat/completions", json=body, timeout=5).content)
    assert all(e["choices"] for e in plain)
    asked = sse_json(requests.post(fake_vllm.url + "/v1/chat/completions", timeout=5,
                                   json={**body, "stream_options": {"include_usage": True}}).content)
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 3


def test_held_headers_wait_for_the_test(fake_vllm):
    fake_vllm.hold_headers = gate = threading.Event()
    answers = []
    thread = threading.Thread(target=lambda: answers.append(requests.post(
        fake_vllm.url + "/v1/completions", json={"prompt": "x"}, timeout=5)))
    thread.start()
    wait_until(lambda: fake_vllm.generation_requests, 2, "the request")
    assert not answers
    gate.set()
    thread.join(5)
    assert answers[0].status_code == 200
