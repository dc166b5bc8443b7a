"""Heartbeats (': keep-alive') on every streamed route while vLLM is silent: before its headers,
mid-stream, and until the stream ends. Real gunicorn + gevent; the fake vLLM stays silent until the
test has seen the heartbeats it waits for (states, not durations)."""

import threading

import pytest
import requests

from unit_helpers import ALICE_KEY, DCE_EXTENSION_BODY, bearer
from wire import parse_sse, read_extension_body, wait_until

STREAMS = {
    "/api/dce/proxy": DCE_EXTENSION_BODY,
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    "/v1/completions": {"prompt": "hi", "stream": True},
    "/api/dce/generate": {"prompt": "hi", "n": 1, "stream": True},
}
BEAT = b": keep-alive\n\n"


@pytest.fixture(scope="module")
def beating_server(_fake_vllm_server, tmp_path_factory):
    from conftest import ProxyServer, app_env
    server = ProxyServer(app_env(_fake_vllm_server, {"DCE_HEARTBEAT_SECONDS": "0.2"}),
                         tmp_path_factory.mktemp("beating"))
    yield server
    server.stop()


def read_through_silence(server, route, gate: threading.Event) -> bytes:
    """Streams `route`; once two heartbeats arrived while the fake is held silent, lets it go on;
    returns the whole body."""
    with requests.post(f"{server.url}{route}", json=STREAMS[route], headers=bearer(ALICE_KEY),
                       stream=True, timeout=10) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        body = b""
        chunks = r.iter_content(chunk_size=None)
        while body.count(BEAT) < 2:
            body += next(chunks)
        gate.set()
        return body + b"".join(chunks)


@pytest.mark.parametrize("route", list(STREAMS))
def test_heartbeats_before_vllm_sends_its_headers(beating_server, fake_vllm, route):
    # The model list first: only the generation is held.
    requests.get(f"{beating_server.url}/v1/models", headers=bearer(ALICE_KEY), timeout=5)
    fake_vllm.hold_headers = gate = threading.Event()
    body = read_through_silence(beating_server, route, gate)
    assert fake_vllm.generation_requests[-1].response_status == 200
    assert parse_sse(body).comments >= 2 and parse_sse(body).events[-1] == "[DONE]"
    assert body.decode().count(f"{fake_vllm.word}0.") == fake_vllm.n_chunks, "tokens lost"
    if route == "/api/dce/proxy":
        assert read_extension_body(body).shown == (fake_vllm.expected_text(0), "stop")


@pytest.mark.parametrize("route", list(STREAMS))
def test_heartbeats_while_vllm_stalls_mid_stream(beating_server, fake_vllm, route):
    fake_vllm.n_chunks, fake_vllm.fault, fake_vllm.fault_after = 4, "stall", 2
    fake_vllm.hold_stream = gate = threading.Event()
    body = read_through_silence(beating_server, route, gate)
    before = body.partition(BEAT)[0]
    assert fake_vllm.word.encode() in before, "the heartbeats came before the first tokens, not in the stall"
    assert parse_sse(body).events[-1] == "[DONE]" and b'"error"' not in body
    assert body.decode().count(f"{fake_vllm.word}0.") == fake_vllm.n_chunks, "tokens lost"
    if route == "/api/dce/proxy":
        result = read_extension_body(body)
        assert result.shown == (fake_vllm.expected_text(0), "stop") and result.heartbeats >= 2


def test_vllm_error_after_the_first_heartbeat_is_an_event(beating_server, fake_vllm):
    requests.get(f"{beating_server.url}/v1/models", headers=bearer(ALICE_KEY), timeout=5)
    fake_vllm.force_error = (400, {"error": {"message": "prompt too long", "type": "BadRequestError",
                                             "param": None, "code": 400}})
    fake_vllm.hold_headers = gate = threading.Event()
    result = read_extension_body(read_through_silence(beating_server, "/api/dce/proxy", gate))
    assert result.content == "\n\n[DCE proxy error: prompt too long]"
    assert result.finish_reason == "error" and result.saw_done and result.heartbeats >= 2


def test_a_vllm_error_within_the_interval_keeps_its_status(proxy_server, fake_vllm):
    # Answers that come within one heartbeat interval keep their status (here: vLLM's 404). An
    # interval far longer than the fake takes to answer, whatever the machine's load.
    server = proxy_server(DCE_HEARTBEAT_SECONDS="30")
    fake_vllm.force_error = (404, {"error": {"message": "no", "type": "NotFoundError", "param": None, "code": 404}})
    r = requests.post(f"{server.url}/api/dce/proxy", json=DCE_EXTENSION_BODY, headers=bearer(ALICE_KEY),
                      timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no"


def test_a_real_stall_still_ends_with_the_visible_error(proxy_server, fake_vllm):
    server = proxy_server(DCE_HEARTBEAT_SECONDS="0.2", DCE_FIRST_BYTE_TIMEOUT="1")
    fake_vllm.n_chunks, fake_vllm.fault, fake_vllm.fault_after, fake_vllm.stall_seconds = 4, "stall", 2, 3
    r = requests.post(f"{server.url}/api/dce/proxy", json=DCE_EXTENSION_BODY, headers=bearer(ALICE_KEY), timeout=10)
    result = read_extension_body(r.content)
    assert result.content.startswith(fake_vllm.expected_text(0, 2) + "\n\n[DCE proxy error: ")
    assert result.finish_reason == "error" and result.saw_done
    wait_until(lambda: fake_vllm.disconnects, 5, "vLLM to see the proxy close the stalled stream")


def test_a_new_workers_first_stream_beats_while_vllm_is_silent(proxy_server, fake_vllm):
    # Each worker reads the model list as it starts: its first request must not wait on a silent
    # vLLM's list with nothing sent (the client would give up after 60 s).
    server = proxy_server(DCE_HEARTBEAT_SECONDS="0.2")
    fake_vllm.models_delay = 30
    fake_vllm.hold_headers = gate = threading.Event()
    body = read_through_silence(server, "/api/dce/proxy", gate)
    assert parse_sse(body).comments >= 2 and parse_sse(body).events[-1] == "[DONE]"


def test_a_response_stream_beats_while_vllm_is_silent_and_stalls(beating_server, fake_vllm):
    """/v1/responses: heartbeats before vLLM's headers and in a stall; its events all arrive, the
    last one response.completed (the Responses API has no [DONE])."""
    requests.get(f"{beating_server.url}/v1/models", headers=bearer(ALICE_KEY), timeout=5)
    fake_vllm.n_chunks, fake_vllm.fault, fake_vllm.fault_after = 4, "stall", 2
    fake_vllm.hold_headers = before_headers = threading.Event()
    fake_vllm.hold_stream = in_stall = threading.Event()
    with requests.post(f"{beating_server.url}/v1/responses", json={"input": "hi", "stream": True},
                       headers=bearer(ALICE_KEY), stream=True, timeout=10) as r:
        chunks, body = r.iter_content(chunk_size=None), b""
        while body.count(BEAT) < 2:
            body += next(chunks)
        before_headers.set()
        while b"response.output_text.delta" not in body:
            body += next(chunks)
        beats = body.count(BEAT)
        while body.count(BEAT) < beats + 2:  # in the stall
            body += next(chunks)
        in_stall.set()
        body += b"".join(chunks)
    assert body.replace(BEAT, b"") == bytes(fake_vllm.generation_requests[-1].response_body)
    assert parse_sse(body).events[-1].startswith('{"response"') and b"event: response.completed" in body
