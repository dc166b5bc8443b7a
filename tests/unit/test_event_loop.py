"""event_loop.py: the drop check of a pooled connection to vLLM, and tasks started beside a request."""

from __future__ import annotations

import os
import resource
import select
import socket
import threading

from dce_proxy.event_loop import UpstreamConnection, readable_now, start_beside


def _pooled_connection() -> tuple[UpstreamConnection, socket.socket]:
    """A connection as urllib3 keeps it in the pool, and vLLM's end of it."""
    listener = socket.create_server(("127.0.0.1", 0))
    connection = UpstreamConnection("127.0.0.1", listener.getsockname()[1])
    connection.connect()
    peer, _ = listener.accept()
    listener.close()
    return connection, peer


def _wait_readable(sock) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    assert poller.poll(10_000)


def test_a_connection_vllm_keeps_open_is_reused():
    connection, peer = _pooled_connection()
    assert connection.is_connected
    peer.close()
    connection.close()


def test_a_connection_vllm_closed_while_idle_is_told_dropped():
    connection, peer = _pooled_connection()
    peer.close()  # vLLM drops a keep-alive connection idle for 5 s
    _wait_readable(connection.sock)  # until the end of file reaches this side
    assert not connection.is_connected
    connection.close()


def test_a_connection_with_bytes_nobody_asked_for_is_told_dropped():
    connection, peer = _pooled_connection()
    peer.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    _wait_readable(connection.sock)
    assert readable_now(connection.sock) and not connection.is_connected
    peer.close()
    connection.close()


def test_a_closed_connection_is_not_connected():
    connection, peer = _pooled_connection()
    connection.close()
    assert not connection.is_connected
    peer.close()


def test_a_task_started_beside_runs_with_its_arguments():
    ran = threading.Event()
    seen = []
    start_beside(lambda a, b: (seen.append((a, b)), ran.set()), 1, "two", name="test")
    assert ran.wait(10) and seen == [(1, "two")]


def test_a_connection_above_descriptor_1023_is_checked_too():
    # A worker holding 1,000 streams has descriptors above select()'s 1023: the check must not care.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(hard, 4096) if hard != resource.RLIM_INFINITY else hard))
    connection, peer = _pooled_connection()
    high = socket.socket(fileno=os.dup2(connection.sock.fileno(), 2000))
    try:
        assert not readable_now(high)
        peer.close()
        _wait_readable(high)  # until the end of file reaches this side
        assert readable_now(high)
    finally:
        high.close()
        connection.close()
