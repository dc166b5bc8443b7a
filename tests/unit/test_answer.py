"""vLLM's answer read straight from its connection (answer.py): the body that came with the head
comes first, a wait without bytes is a time for a heartbeat, silence past the limit and a cut
connection are errors of their own, and the connection goes back to the pool only when its body was
read whole; what vLLM sends that is not HTTP is an error of vLLM's."""

from __future__ import annotations

import errno
import socket
import ssl
import subprocess
import threading
import time

import pytest

from dce_proxy.answer import Answer, AnswerParser, UpstreamStreamError
from dce_proxy.config import load_settings
from dce_proxy.errors import ApiError
from dce_proxy.opener import Opened, StreamOpener
from dce_proxy.upstream import Upstream
from unit_helpers import vllm_answering_once

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b"data: {}\n\n"
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
LAST = b"0\r\n\r\n"


class _Connection:
    """Where the answer's connection went: back to the pool, or closed."""

    def __init__(self):
        self.released = self.closed = False

    def release(self):
        self.released = True

    def close(self):
        self.closed = True


@pytest.fixture
def pair():
    ours, vllm = socket.socketpair()
    with ours, vllm:
        yield ours, vllm


def _body(pair, sent: bytes, silence: float = 30.0) -> Answer:
    """The answer to what vLLM `sent`, its head read as SentRequest reads it (with whatever came with it)."""
    ours, vllm = pair
    vllm.sendall(sent)
    parsed, early = AnswerParser(), []
    while not parsed.head_done:
        early.append(parsed.feed(ours.recv(65536)))
    connection = _Connection()
    answer = Answer(parsed, b"".join(early), ours, silence, connection.release, connection.close)
    answer.connection = connection
    return answer


def test_events_read_with_the_head_come_first_then_the_socket_and_the_connection_is_pooled(pair):
    body = _body(pair, HEAD + CHUNK * 3)
    assert body.read(30) == EVENT * 3  # read with the head already
    pair[1].sendall(CHUNK + LAST)
    assert body.read(30) == EVENT
    assert body.done and body.connection.released and not body.connection.closed


def test_a_wait_without_bytes_is_none_and_the_stream_goes_on(pair):
    body = _body(pair, HEAD)
    assert body.read(0.05) is None
    pair[1].sendall(CHUNK)
    assert body.read(30) == EVENT and not body.done


def test_silence_past_the_limit_is_a_timeout(pair):
    body = _body(pair, HEAD, silence=0.1)
    with pytest.raises(UpstreamStreamError) as raised:
        while True:
            body.read(0.05)
    assert raised.value.error.status == 504 and "stopped sending tokens" in raised.value.error.message


def test_a_connection_cut_mid_stream_is_an_error_not_an_end(pair):
    body = _body(pair, HEAD + CHUNK)
    assert body.read(30) == EVENT
    pair[1].shutdown(socket.SHUT_WR)
    with pytest.raises(UpstreamStreamError) as raised:
        body.read(30)
    assert raised.value.error.status == 503 and "closed the stream" in raised.value.error.message


def test_a_host_that_stopped_answering_keep_alive_is_a_cut_not_a_silence(pair):
    # The kernel's ETIMEDOUT is a TimeoutError too, but not the wait's own timeout.
    body = _body(pair, HEAD)

    class _Vanished:
        def settimeout(self, seconds):
            pass

        def recv(self, size):
            raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")

    body._sock = _Vanished()
    with pytest.raises(UpstreamStreamError) as raised:
        body.read(30)
    assert raised.value.error.status == 503
    assert body.connection.closed


def test_bytes_after_the_body_keep_the_connection_out_of_the_pool(pair):
    body = _body(pair, HEAD + CHUNK + LAST + b"HTTP/1.1 200 OK\r\n")
    assert body.read(30) == EVENT
    assert body.done and body.connection.closed and not body.connection.released


def test_a_body_without_chunks_ends_at_its_length_or_at_the_close(pair):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    body = _body(pair, head + b"Content-Length: %d\r\n\r\n" % (2 * len(EVENT)) + EVENT)
    assert body.read(30) == EVENT and not body.done
    pair[1].sendall(EVENT)
    assert body.read(30) == EVENT and body.done and body.connection.released
    ours, vllm = socket.socketpair()
    with ours, vllm:
        body = _body((ours, vllm), head + b"\r\n" + EVENT)
        assert body.read(30) == EVENT and not body.done
        vllm.shutdown(socket.SHUT_WR)
        assert body.read(30) == b"" and body.done and body.connection.closed


def test_a_whole_answer_that_came_with_its_head_is_pooled_at_once_and_still_read(pair):
    body = _body(pair, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert body.connection.released and not body.done
    assert body.read(30) == b"{}" and body.done


def test_broken_chunked_coding_is_vllms_garbage(pair):
    body = _body(pair, HEAD + b"zz\r\n")
    with pytest.raises(UpstreamStreamError) as raised:
        body.read(30)
    assert raised.value.error.status == 502


def test_the_end_after_the_last_event_is_read_so_the_connection_is_pooled(pair):
    body = _body(pair, HEAD + CHUNK)
    assert body.read(30) == EVENT
    pair[1].sendall(LAST)
    body.read_end(30)
    assert body.done and body.connection.released and not body.connection.closed


def test_an_end_that_does_not_come_closes_the_connection(pair):
    body = _body(pair, HEAD + CHUNK)
    assert body.read(30) == EVENT
    body.read_end(0.05)
    assert body.connection.closed and not body.connection.released


@pytest.mark.parametrize("framing", ["chunked", "until close"])
def test_a_stream_vllm_says_it_closes_is_read_to_its_end_and_never_pooled(framing):
    # uvicorn sends "Connection: close" on answers it starts while shutting down.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
    answer = head + (b"Transfer-Encoding: chunked\r\n\r\n" + CHUNK * 3 + LAST if framing == "chunked"
                     else b"\r\n" + EVENT * 3)
    with vllm_answering_once(answer) as url:
        upstream = Upstream(load_settings({"DCE_API_KEYS": "alice:" + "a" * 32, "VLLM_URL": url}))
        opened = StreamOpener(upstream, "/v1/chat/completions", b"{}", {}).outcome(30)
        assert isinstance(opened, Opened), opened
        received = b""
        while not opened.body.done:
            received += opened.body.read(30) or b""
        assert received == EVENT * 3
        assert all(connection is None for connection in upstream._pool.pool.queue)


def test_time_spent_away_from_the_socket_is_not_vllms_silence(pair):
    body = _body(pair, HEAD + CHUNK, silence=0.2)
    assert body.read(30) == EVENT
    time.sleep(0.3)  # the response writing to a slow client meanwhile, longer than the limit
    pair[1].sendall(CHUNK)
    assert body.read(30) == EVENT


def _request_read(conn) -> bool:
    """Reads one request (its headers, then its Content-Length of body); False once the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return False
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
    return True


@pytest.fixture
def tls_vllm(tmp_path, monkeypatch):
    """A vLLM stand-in over TLS (1.3, as uvicorn's): each request on a connection gets its headers at
    once, then, once the test releases `go`, five events and the end. The proxy's side trusts it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    go = threading.Semaphore(0)

    def serve():
        with context.wrap_socket(listener.accept()[0], server_side=True) as conn:
            while _request_read(conn):
                conn.sendall(HEAD)
                go.acquire()
                for _ in range(5):
                    conn.sendall(CHUNK)
                conn.sendall(LAST)

    threading.Thread(target=serve, daemon=True).start()
    with listener:
        yield f"https://localhost:{listener.getsockname()[1]}", go


def test_streams_over_tls_wait_come_whole_and_reuse_their_connection(tls_vllm):
    url, go = tls_vllm
    upstream = Upstream(load_settings({"DCE_API_KEYS": "alice:" + "a" * 32, "VLLM_URL": url}))
    for _ in range(2):
        opened = StreamOpener(upstream, "/v1/chat/completions", b"{}", {}).outcome(30)
        assert isinstance(opened, Opened), opened
        assert opened.body.read(0.05) is None  # vLLM silent: a time for a heartbeat
        go.release()
        received = b""
        while not opened.body.done:
            received += opened.body.read(30) or b""
        assert received == EVENT * 5
    assert sum(connection is not None for connection in upstream._pool.pool.queue) == 1  # one, reused


def _upstream(url: str, **env: str) -> Upstream:
    return Upstream(load_settings({"DCE_API_KEYS": "alice:" + "a" * 32, "VLLM_URL": url, **env}))


def test_an_answer_that_is_not_http_is_a_503():
    with vllm_answering_once(b"SSH-2.0-OpenSSH_9.2\r\n\r\n") as url:
        with pytest.raises(ApiError) as raised:
            _upstream(url).request("GET", "/v1/models")
    assert raised.value.status == 503


def test_a_good_head_then_broken_chunks_opens_the_stream_and_its_read_is_a_502():
    with vllm_answering_once(HEAD + b"zz\r\n") as url:
        opened = StreamOpener(_upstream(url), "/v1/chat/completions", b"{}", {}).outcome(30)
        assert isinstance(opened, Opened), opened
        with pytest.raises(UpstreamStreamError) as raised:
            opened.body.read(30)
    assert raised.value.error.status == 502 and "not valid HTTP" in raised.value.error.message


def test_the_request_goes_out_whole_with_its_host_length_and_the_proxys_key(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def serve():
        conn, _ = listener.accept()
        with conn:
            data = b""
            while not data.endswith(b"{}"):
                data += conn.recv(65536)
            received.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    threading.Thread(target=serve, daemon=True).start()
    with listener:
        port = listener.getsockname()[1]
        (tmp_path / "vllm-key").write_text("v" * 32)
        upstream = _upstream(f"http://127.0.0.1:{port}/prefix", VLLM_API_KEY_FILE=str(tmp_path / "vllm-key"))
        answer = upstream.request("POST", "/v1/completions", body=b"{}", headers={"X-Session-Id": "s1"})
        assert answer.status == 200 and answer.read(30) == b"{}" and answer.done
    head, _, body = received[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /prefix/v1/completions HTTP/1.1" and body == b"{}"
    assert {f"Host: 127.0.0.1:{port}", "Authorization: Bearer " + "v" * 32, "X-Session-Id: s1",
            "Content-Type: application/json", "Content-Length: 2", "Accept-Encoding: identity"} <= set(lines)


@pytest.mark.parametrize("method, path, headers", [
    ("POST", "/v1/a b", {}), ("POST", "/v1/a\r\nX: y", {}), ("PO ST", "/v1/a", {}),
    ("POST", "/v1/a", {"X-A": "1\r\nX-B: 2"}), ("POST", "/v1/a", {"X A": "1"}),
    ("POST", "/v1/a", {"Authorization": "Bearer someone-else"}), ("POST", "/v1/a", {"content-length": "0"})])
def test_a_request_that_would_break_its_framing_is_refused_before_it_goes_out(method, path, headers):
    with pytest.raises(ValueError):
        _upstream("http://127.0.0.1:9")._request_bytes(method, path, b"{}", headers)


def test_a_post_without_body_says_its_length_is_zero():
    head = _upstream("http://127.0.0.1:9")._request_bytes("POST", "/v1/responses/r1/cancel", None, {})
    assert b"\r\nContent-Length: 0\r\n" in head and head.endswith(b"\r\n\r\n")
    assert b"Content-Length" not in _upstream("http://127.0.0.1:9")._request_bytes("GET", "/v1/models", None, {})
