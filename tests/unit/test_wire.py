"""tests/wire.py reads like the extension, never more kindly: checked on hand-written bodies and on
live sockets (a tiny server that goes silent)."""

import json
import socket
import threading
from pathlib import Path

import pytest
import requests

from wire import PROXY_UNREACHABLE, extension_body, parse_sse, post_like_extension, read_extension_body, wait_until

REPO = Path(__file__).resolve().parents[2]


def chunk(finish="<null>", **delta) -> str:
    choice = {"index": 0, "delta": delta}
    if finish != "<absent>":
        choice["finish_reason"] = None if finish == "<null>" else finish
    return "data: " + json.dumps({"choices": [choice]}) + "\n\n"


def test_text_of_the_end_chunk_is_not_shown():
    body = chunk(content="Hello ") + chunk(finish="length", content="world") + "data: [DONE]\n\n"
    result = read_extension_body(body)
    assert result.shown == ("Hello ", "length")
    assert result.ended and result.saw_done and result.chunks == 2


@pytest.mark.parametrize("end", [
    chunk(finish="<absent>", content="x"),
    'data: {"choices": []}\n\n',
    'data: {"usage": {"completion_tokens": 3}}\n\n',
])
def test_a_chunk_without_finish_reason_null_ends_the_tab(end):
    result = read_extension_body(chunk(content="a") + end + chunk(content="b"))
    assert result.ended and result.shown == ("a", None)


def test_a_top_level_error_is_ignored_and_reasoning_is_read():
    error = 'data: {"error": {"message": "boom"}, "choices": [{"index": 0, "delta": {"content": "!"}, ' \
            '"finish_reason": null}]}\n\n'
    result = read_extension_body(chunk(reasoning_content="hmm ", content=None) + error + chunk(finish="stop"))
    assert result.shown == ("!", "stop") and result.reasoning == "hmm "


def test_comments_are_counted_as_heartbeats():
    body = ": keep-alive\n\n" + chunk(content="a") + ": keep-alive\n\n" + chunk(finish="stop") + "data: [DONE]\n\n"
    assert read_extension_body(body).heartbeats == 2
    assert parse_sse(body).comments == 2 and parse_sse(body).events[-1] == "[DONE]"


def test_non_200_is_a_failed_tab_and_the_test_is_told_why():
    assert read_extension_body(b'{"error": {}}', status=429).failure == "HTTP 429"
    caddy = (REPO / "caddy/Caddyfile").read_text().split("handle_errors 502 503 504 {")[1].split("`")[1]
    failure = read_extension_body(caddy.encode(), status=502).failure
    assert failure.startswith(PROXY_UNREACHABLE) and "not reachable" in failure


def silent_server(first_bytes: bytes):
    """A server that sends `first_bytes` and then nothing; returns (url, stop)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(first_bytes)
        stop.wait(10)
        conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/", stop


@pytest.mark.parametrize("first_bytes, stage", [
    (b"", "waiting for the answer"),  # no headers at all
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
     "reading the answer"),
])
def test_silence_longer_than_the_limit_is_a_socket_timeout(first_bytes, stage):
    url, stop = silent_server(first_bytes)
    try:
        result = post_like_extension(requests.Session(), url, extension_body("hi"), silence_limit=0.3)
    finally:
        stop.set()
    assert result.failure == "Socket timeout" and result.timed_out == stage


def test_on_chunk_false_closes_like_the_stop_button():
    data = chunk(content="a").encode()
    url, stop = silent_server(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(data) + data + b"\r\n")
    seen = []
    try:
        result = post_like_extension(requests.Session(), url, extension_body("hi"),
                                     on_chunk=lambda r: seen.append(r.content) or False, silence_limit=5)
    finally:
        stop.set()
    assert seen == ["a"] and result.failure is None and not result.ended


def test_wait_until_names_what_it_waited_for():
    assert wait_until(lambda: 3, 1, "three") == 3
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, 0.05, "the impossible")
