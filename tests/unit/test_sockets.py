"""Asking a socket whether it has something to read, without waiting (dce_proxy/sockets.py): for
vLLM's pooled connections and for a client waiting in line, at any descriptor number."""

import resource
import socket

import pytest

from dce_proxy import sockets
from dce_proxy.stream import _client_gone_probe
from dce_proxy.config import load_settings
from dce_proxy.upstream import Upstream, _Connection


@pytest.fixture
def high_socket_pair():
    """A connected pair whose first socket's descriptor is above 1,023, where select() refuses it: a
    worker holding 500 streams has such descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, 2048)
    try:  # (a hard limit below that can be raised by root, as CI runs)
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (wanted, hard if hard == resource.RLIM_INFINITY else max(hard, wanted)))
    except (ValueError, OSError) as exc:
        pytest.fail(f"cannot allow {wanted} open files (limit {soft}/{hard}): {exc}; these tests need a "
                    "descriptor above 1,023")
    opened = []
    try:
        opened += [socket.socket() for _ in range(1030)]
        ours, peer = socket.socketpair()
        opened += [ours, peer]
        assert ours.fileno() > 1023
        yield ours, peer
    finally:
        for sock in opened:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_readable_now_tells_idle_data_and_closed_apart_at_a_high_descriptor(high_socket_pair):
    ours, peer = high_socket_pair
    assert sockets.readable_now(ours) is False
    peer.sendall(b"x")
    assert sockets.readable_now(ours) is True
    ours.recv(1)
    peer.close()
    assert sockets.readable_now(ours) is True  # the end of the stream reads too


def test_a_pooled_connection_vllm_closed_or_wrote_to_while_idle_is_not_reused(high_socket_pair):
    ours, peer = high_socket_pair
    connection = _Connection("vllm", 8000)
    connection.sock = ours
    assert connection.is_connected
    peer.sendall(b"HTTP/1.1 200 OK\r\n")  # nothing may come on an idle connection
    assert not connection.is_connected
    connection.sock = None
    assert not connection.is_connected


def test_a_client_in_line_is_seen_leaving_at_a_high_descriptor(high_socket_pair):
    ours, peer = high_socket_pair
    gone = _client_gone_probe({"gunicorn.socket": ours})
    assert gone() is False
    peer.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request is not a goodbye
    assert gone() is False
    ours.recv(64)
    peer.close()
    assert gone() is True


@pytest.mark.parametrize("url", ["http://vllm:8000", "https://vllm:8443"])
def test_the_pool_checks_its_connections_so_over_http_and_https(url):
    upstream = Upstream(load_settings({"DCE_API_KEYS": "alice:" + "a" * 32, "VLLM_URL": url}))
    connection = upstream._pool._new_conn()  # (not connected yet: made, never opened)
    assert type(connection).is_connected is _Connection.is_connected
    assert not connection.is_connected


def test_readable_within_waits_for_bytes_or_the_time_at_a_high_descriptor(high_socket_pair):
    ours, peer = high_socket_pair
    assert not sockets.readable_within(ours, 0.05)
    peer.sendall(b"x")
    assert sockets.readable_within(ours, 30)


def test_readable_within_waits_in_gevents_loop_for_a_workers_socket():
    # A worker's sockets are gevent's: other greenlets run while one waits (as its reads wait).
    import gevent
    import gevent.socket

    ours, peer = gevent.socket.socketpair()
    with ours, peer:
        ran = []
        other = gevent.spawn(ran.append, "other")
        assert not sockets.readable_within(ours, 0.05)
        assert ran == ["other"]
        gevent.spawn_later(0.05, peer.sendall, b"x")
        assert sockets.readable_within(ours, 30)
        other.join()
