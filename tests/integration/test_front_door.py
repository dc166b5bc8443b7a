"""What Caddy answers by itself: the body cap in the proxy's unit, and its own errors in the proxy's
JSON shape (issue 12)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl

import pytest

from unit_helpers import assert_error  # the error-shape check the unit suite uses, for any response
from wire import wait_until

CAP_MIB = 50  # DCE_MAX_BODY_MB, the default
MIB = 1024 * 1024


def test_a_body_under_the_cap_in_mib_reaches_the_proxy(stack, session):
    # Over 50 * 10^6 bytes but under 50 MiB: Caddy used to refuse it while the proxy would take it.
    body = b"x" * (CAP_MIB * 1_000_000 + 1000)
    response = session.post(f"{stack.base}/k/{stack.key}/v1/chat/completions", data=body,
                            headers={"Content-Type": "application/json"}, timeout=120)
    # The proxy read it all, and found it is not JSON.
    assert assert_error(response, 400)["code"] == "invalid_json"


@pytest.mark.disruptive
def test_the_proxy_down_is_a_json_502_with_retry_after(stack, session):
    proxy = stack.container("proxy")
    proxy.stop(timeout=5)
    try:
        response = session.get(f"{stack.base}/v1/models", headers={"Authorization": f"Bearer {stack.key}"},
                               timeout=60)
        assert assert_error(response, 502)["code"] == "proxy_unavailable"
        assert int(response.headers["Retry-After"]) > 0
    finally:
        proxy.start()
        wait_until(stack.ready, 120, "the proxy to serve again", interval=1)


def test_a_body_over_the_cap_is_refused_by_caddy_in_the_proxys_json_shape(stack):
    # Chunked, so that neither Caddy nor the proxy knows the size up front: Caddy counts what it
    # reads and refuses past the cap, before the proxy (which only sees what Caddy passed on) can.
    # The client stops sending just past the cap and reads, as a client whose upload was refused.
    context = ssl.create_default_context(cafile=stack.ca_file)
    chunk = b"x" * MIB
    with socket.create_connection(("localhost", stack.https_port), timeout=60) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:{stack.https_port}\r\n"
                    f"Authorization: Bearer {stack.key}\r\nContent-Type: application/json\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(CAP_MIB + 1):
                tls.sendall(f"{MIB:x}\r\n".encode() + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # Caddy already answered and closed: its answer is still there to read
        response = http.client.HTTPResponse(tls)
        response.begin()
        assert response.status == 413
        body = response.read()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == "request_too_large", error
    assert error["message"] == f"The request body is larger than {CAP_MIB}MiB."  # Caddy's, not the proxy's
