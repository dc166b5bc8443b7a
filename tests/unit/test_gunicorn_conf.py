"""The server settings of proxy/gunicorn.conf.py that only show under load, checked on the objects
gunicorn's gevent worker builds (the server behaviour itself: test_server.py)."""

import inspect
import os
import socket
import subprocess
import sys

from gunicorn.workers import ggevent

from conftest import PROXY_DIR, ProxyServer
from wire import wait_until

# Runs the config as gunicorn does, then as a worker after its fork, and builds the server
# GeventWorker.run builds: printed are its accepts per turn with one worker, and once gunicorn
# lowered them to 1 for several.
_PROBE = """
import runpy, sys
from gunicorn.workers import ggevent
config = runpy.run_path(sys.argv[1])
config["post_fork"](None, None)
server = ggevent.StreamServer(("127.0.0.1", 0), handle=lambda *args: None)
one_worker = server.max_accept
server.max_accept = 1
print(config["accepts_per_turn"], one_worker, server.max_accept)
"""


def test_with_several_workers_each_accepts_a_burst_of_connections_per_turn_not_one():
    env = {name: value for name, value in os.environ.items() if not name.startswith("GEVENT_")}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(PROXY_DIR / "gunicorn.conf.py")], env=env,
                          cwd=PROXY_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    per_turn, one_worker, several = (int(word) for word in done.stdout.split())
    assert per_turn > 1
    assert one_worker == 100  # gevent's own, as before
    assert several == per_turn


def test_gunicorn_still_builds_its_servers_by_that_name_and_lowers_them_so():
    # The setting works through these two lines of gunicorn's (pinned); an upgrade that changes them
    # must be looked at, not silently lose it.
    run = inspect.getsource(ggevent.GeventWorker.run)
    assert "server = StreamServer(" in run
    assert "server.max_accept = 1" in run


# A WSGI app whose requests, but its health check, never give the others a turn, with what
# post_worker_init asks of the proxy's.
_STUCK_APP = """
class _Upstream:
    def learn_models(self):
        pass


class StuckApp:
    extensions = {"dce_upstream": _Upstream()}

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/healthz":
            start_response("200 OK", [])
            return [b"ok"]
        return spin_without_a_turn()


def spin_without_a_turn():
    while True:
        pass


app = StuckApp()
"""


def test_a_worker_stopped_for_a_missed_heartbeat_logs_where_it_was(tmp_path):
    (tmp_path / "stuck_app.py").write_text(_STUCK_APP)
    server = ProxyServer({}, tmp_path, ("--timeout", "2"), app="stuck_app:app", app_dir=tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(lambda: "missed its heartbeat" in server.logs(), 60, "the worker's abort", interval=0.1,
                       state=server.logs)
    finally:
        server.stop()
    aborted = server.logs().split("missed its heartbeat", 1)[1]
    assert "in spin_without_a_turn" in aborted  # the code that kept the worker from its heartbeat
    assert "in worker_abort" not in aborted and "in handle_abort" not in aborted  # (the hook's own frames)
