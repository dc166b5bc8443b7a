"""Small helpers shared by the unit tests (keys, auth headers, SSE parsing)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import requests

from wire import ExtensionResult, extension_body, free_port, post_like_extension, sse_events

ALICE_KEY = "test-key-aaaaaaaaaaaaaaaa"
BOB_KEY = "test-key-bbbbbbbbbbbbbbbb"
TEST_KEYS = f"alice:{ALICE_KEY},bob:{BOB_KEY}"

# The request the DCE VS Code extension v1.2.0 sends (contract, /api/dce/proxy).
DCE_EXTENSION_BODY = extension_body("Summarise the selected files.")


def bearer(key: str = ALICE_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(key: str = ALICE_KEY, user: str = "dce") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def sse_json(raw: bytes | str) -> list[dict[str, Any]]:
    """The JSON events of an SSE body; asserts it ends with exactly one [DONE]."""
    data = sse_events(raw)
    assert data and data[-1] == "[DONE]", f"stream does not end with [DONE]: {data[-3:]}"
    assert data.count("[DONE]") == 1, "more than one [DONE]"
    return [json.loads(d) for d in data[:-1]]


def without_usage_event(raw: bytes) -> bytes:
    """vLLM's stream as a client that did not ask for usage receives it: the proxy asked vLLM for
    its usage event (no choices, a usage object) and keeps it from the client; all else is as sent."""
    def is_usage(event: bytes) -> bool:
        data = event.removeprefix(b"data: ")
        try:
            payload = json.loads(data)
        except ValueError:
            return False
        return isinstance(payload, dict) and "usage" in payload and not payload.get("choices")

    return b"".join(event + b"\n\n" for event in raw.split(b"\n\n")[:-1] if not is_usage(event))


def assert_error(resp, status: int, type_: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The contract's error shape: {"error": {"message": str, "type": str, "code": str|int}}."""
    body = resp.get_data() if hasattr(resp, "get_data") else resp.content
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {body[:300]!r}"
    assert b"Traceback" not in body
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers.get("Content-Type")
    obj = json.loads(body)
    err = obj["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert isinstance(err["code"], (str, int)) and not isinstance(err["code"], bool)
    if type_ is not None:
        assert err["type"] == type_, err
    if param is not None:
        assert err.get("param") == param, err
    return err


def closed_port_url() -> str:
    """A URL on which nothing listens (connection refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


def timed_events(resp) -> list[tuple[float, str]]:
    """(arrival time, data payload) of each SSE event of a `requests` stream,
    read as the bytes arrive (no buffering on our side)."""
    events, buf = [], b""
    for chunk in resp.iter_content(chunk_size=None):
        now = time.monotonic()
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.decode().split("\n"):
                if line.startswith("data:"):
                    events.append((now, line[5:].strip()))
    return events


def raw_http(port: int, method: str, path: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> socket.socket:
    """Send one HTTP/1.1 request on a fresh socket and return the socket, so a
    test can read part of the answer and then hang up like a real client."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def read_events_then_hang_up(sock: socket.socket, count: int) -> bytes:
    """Read from `sock` until `count` SSE `data:` events arrived, then close
    the socket at once (a client that goes away mid-stream)."""
    buf = b""
    try:
        while buf.count(b"data:") < count:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    return buf


class Tab:
    """One extension tab in a thread of its own; `progress` is its reading so far."""

    def __init__(self, url: str, prompt: str):
        self.prompt = prompt
        self.progress = ExtensionResult()
        self.result: ExtensionResult | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url):
        def seen(progress):
            self.progress = progress

        self.result = post_like_extension(requests.Session(), url, extension_body(self.prompt), on_chunk=seen)

    def join(self) -> ExtensionResult:
        self._thread.join(15)
        assert self.result is not None, f"tab {self.prompt} did not end"
        return self.result


@contextmanager
def access_lines() -> Iterator[list[dict]]:
    """The access log's entries written meanwhile (each is written when its response closes)."""
    lines: list[dict] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.args)
    logging.getLogger("dce_proxy.access").addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger("dce_proxy.access").removeHandler(handler)


@contextmanager
def vllm_answering_once(answer: bytes) -> Iterator[str]:
    """A vLLM stand-in at the URL it yields: it reads one request, writes `answer` (any bytes, even
    broken HTTP) and closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.join(30)
