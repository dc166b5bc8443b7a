"""gunicorn for long token streams: gevent holds thousands of open streams in one process,
where thread workers hold only workers x threads and queue the rest."""

import logging
import os
import re
import shutil
import sys
import traceback

from gevent.server import StreamServer
from gunicorn.workers import ggevent

bind = os.environ.get("DCE_PROXY_BIND", "0.0.0.0:8000")
worker_class = "gevent"
# Name lookups (vLLM's, Redis's): the system's resolver, asked for each new connection, one lookup
# shared by the connections that ask at once (dce_proxy/resolver.py says why, and why no cache).
# gevent reads this when a worker first resolves a name (it replaces any GEVENT_RESOLVER given).
# tests/unit/test_resolver.py checks it.
os.environ["GEVENT_RESOLVER"] = "dce_proxy.resolver.SharedLookups"
# One worker unless told (make up chooses from the host's cores): the in-memory limits then hold for
# the whole service (see config.py); more need Redis.
workers = int(os.environ.get("DCE_PROXY_WORKERS", "1"))
worker_connections = int(os.environ.get("DCE_PROXY_WORKER_CONNECTIONS", "4096"))
# With gevent this is only the worker's heartbeat: a long generation is never cut by it.
timeout = 60
# On SIGTERM, running streams get this long to finish (as in Caddy and vLLM, and compose's
# stop_grace_period: one setting for all).
graceful_timeout = int(os.environ.get("DCE_STOP_GRACE_SECONDS", "600"))
keepalive = 75
# The app writes its own JSON access log, which never holds a /k/KEY path.
accesslog = None
errorlog = "-"


class KeyRedactingFilter(logging.Filter):
    """gunicorn's own error log names the target of a request that failed ("Error handling request
    POST /k/KEY/..."), and bad request lines: the key is cut from them as Caddy's log cuts it, however
    the prefix is spelled (/k/KEY, /%6B/KEY, /k%2FKEY, an absolute URL)."""

    _PATH_KEY = re.compile(r"(?i)/(?:k|%6b)(?:/|%2f)[^/?\s'\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._PATH_KEY.sub("/k/REDACTED", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


# Once: a reload (SIGHUP) runs this file again, with a new class of the same name.
_error_log = logging.getLogger("gunicorn.error")
_error_log.filters = [f for f in _error_log.filters if type(f).__name__ != "KeyRedactingFilter"]
_error_log.addFilter(KeyRedactingFilter())
loglevel = os.environ.get("DCE_LOG_LEVEL", "info")
wsgi_app = "dce_proxy:create_app()"
# No runtime control socket: nothing uses it, and the container's root filesystem is read-only.
control_socket_disable = True


# Metrics (dce_proxy/metrics.py): each worker writes its numbers under this directory, set before
# any worker imports prometheus_client; the master serves their sum on its own port, which Caddy
# does not route.
metrics_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", "/tmp/dce-metrics")
metrics_port = int(os.environ.get("DCE_METRICS_PORT", "9100"))


def on_starting(server):
    # Numbers of a previous run would otherwise be summed in (a restart in place keeps /tmp).
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir, exist_ok=True)


def when_ready(server):
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    # On the proxy's own address (all of the container's, or loopback when bound there).
    start_http_server(metrics_port, addr=bind.rsplit(":", 1)[0].strip("[]"), registry=registry)


def child_exit(server, worker):
    # Its counters stay in the sums; its gauges (streams in flight, waiting) leave them.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


# gevent runs the greenlets that callbacks wake (a new connection's handler, an event set) for at
# most the interpreter's switch interval per turn of its loop, 5 ms by default, then polls the
# sockets again. A worker relaying a thousand streams spends most of each turn on their sockets, and
# new streams waited several turns to start. make bench's 1,000 streams, two alternating runs each,
# TTFT p99 with 5 ms / 50 ms: 1.27 / 1.12 s straight to the proxy, 3.5 / 1.8 s through Caddy.
callback_seconds = 0.05


# With several workers, gunicorn's gevent worker accepts one connection per turn of its loop, and a
# worker relaying hundreds of streams takes tens of milliseconds per turn: a burst of new streams
# (each of Caddy's on a connection of its own) waited seconds unaccepted (make bench, 2 workers, 1,000
# streams: TTFT p99 4-10 s, through Caddy 14.6 s; with 16, 1.3-5.8 s and 5 s). Not gevent's own 100:
# one worker then took most of a load's new connections, which the others could have shared.
accepts_per_turn = 16


class _BurstAcceptingServer(StreamServer):
    """The server gunicorn's gevent worker makes: gevent's accepts per turn with one worker, and no
    fewer than accepts_per_turn when gunicorn lowers them for several."""

    _max_accept = StreamServer.max_accept

    @property
    def max_accept(self) -> int:
        return self._max_accept

    @max_accept.setter
    def max_accept(self, count: int) -> None:
        self._max_accept = max(count, accepts_per_turn)


def post_fork(server, worker):
    sys.setswitchinterval(callback_seconds)
    ggevent.StreamServer = _BurstAcceptingServer  # (the name GeventWorker.run makes its servers with)


def worker_abort(worker):
    # gunicorn aborts a worker that missed its heartbeat (timeout): in a gevent worker, code that ran
    # without a turn for the others or a call that blocked the process. This handler runs on top of
    # that code: where it was is what an operator needs (code only, no values: no prompt, no key).
    where = "".join(traceback.format_stack()[:-2])  # (without gunicorn's handler and this function)
    worker.log.critical("worker %s missed its heartbeat and is stopped; it was running:\n%s", worker.pid, where)


def post_worker_init(worker):
    # Each worker learns vLLM's model list as it starts, when vLLM answers at once: a first request
    # then never waits on a silent engine with nothing sent. (While vLLM loads, a request reads it.)
    worker.wsgi.extensions["dce_upstream"].learn_models()
