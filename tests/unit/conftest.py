"""Fixtures of the unit suite: a fake vLLM, the Flask app built against it, and
the real gunicorn server (for streaming timing, disconnects and concurrency,
which the Flask test client cannot show)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, settings

import figures
from fake_vllm import FakeVLLM
from make_up import make_checkout
from unit_helpers import TEST_KEYS
from wire import free_port

REPO = Path(__file__).resolve().parents[2]
PROXY_DIR = REPO / "proxy"
if str(PROXY_DIR) not in sys.path:  # pytest.ini sets pythonpath too; this helps other runners
    sys.path.insert(0, str(PROXY_DIR))

# Hypothesis: no per-example deadline (requests go over a real socket to the
# fake), no example database written into the work tree, and the same examples
# on every run so CI is reproducible. DCE_FUZZ_RANDOM=1 explores new ones.
settings.register_profile(
    "dce-unit",
    deadline=None,
    database=None,
    derandomize=os.environ.get("DCE_FUZZ_RANDOM") != "1",
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
settings.load_profile("dce-unit")

# Settings every test app starts from; a test overrides what it is about.
# The rate limit is high so that only the rate-limit tests ever meet it.
BASE_ENV = {
    "DCE_API_KEYS": TEST_KEYS,
    "DCE_RATE_LIMIT": "1000000/minute",
    "DCE_FIRST_BYTE_TIMEOUT": "10",
}

FUZZ_STATS = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[FUZZ_STATS] = {"requests": 0, "5xx": 0, "statuses": collections.Counter()}
    figures.reset()  # this run starts the tally (its tests add to it) that the integration run completes


def pytest_collection_modifyitems(config, items):
    # The unit suite must stay fast: a hang fails after 30 s instead of stalling CI.
    unit_dir = Path(__file__).parent
    for item in items:
        if unit_dir in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(30))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = config.stash.get(FUZZ_STATS, None)
    if stats and stats["requests"]:
        figures.add("requests_fuzzed", stats["requests"])
        figures.add("fuzz_5xx", stats["5xx"])
        top = ", ".join(f"{code}: {count}" for code, count in sorted(stats["statuses"].items()))
        terminalreporter.write_sep("-", "fuzz figures")
        terminalreporter.write_line(
            f"fuzzed {stats['requests']} requests through the Flask app; 5xx seen: {stats['5xx']} "
            f"(statuses {top})")


@pytest.fixture(scope="session")
def fuzz_stats(pytestconfig):
    return pytestconfig.stash[FUZZ_STATS]


# -- the fake vLLM --------------------------------------------------------------
@pytest.fixture(scope="session")
def _fake_vllm_server():
    fake = FakeVLLM().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_vllm(_fake_vllm_server):
    """The fake vLLM with default controls and empty observations."""
    _fake_vllm_server.reset()
    yield _fake_vllm_server
    _fake_vllm_server.reset()


# -- the Flask app --------------------------------------------------------------
def app_env(fake: FakeVLLM, overrides: dict) -> dict[str, str]:
    """BASE_ENV + VLLM_URL + overrides; an override of None removes the variable."""
    env = {**BASE_ENV, "VLLM_URL": fake.url}
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


@pytest.fixture
def make_app(fake_vllm):
    """make_app(**env) -> the proxy's Flask app, configured only by `env`."""
    from dce_proxy import create_app

    def _make(**overrides):
        return create_app(app_env(fake_vllm, overrides))

    return _make


@pytest.fixture
def client(make_app):
    return make_app().test_client()


# -- the real server (gunicorn + gevent), as deployed -----------------------------
class ProxyServer:
    """gunicorn with the proxy's config, serving the proxy (or `app`, a WSGI app found in `app_dir`)."""

    def __init__(self, env: dict[str, str], log_dir: Path, gunicorn_args: tuple[str, ...] = (),
                 app: str = "dce_proxy:create_app()", app_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log_dir / f"proxy-{self.port}.stderr"
        self.stdout_path = log_dir / f"proxy-{self.port}.stdout"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DCE_", "VLLM_"))}
        full_env.update(env)
        full_env["DCE_PROXY_BIND"] = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        full_env["DCE_METRICS_PORT"] = self.metrics_url.rsplit(":", 1)[1].split("/")[0]
        self.metrics_dir = log_dir / f"metrics-{self.port}"
        full_env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        full_env["PYTHONPATH"] = os.pathsep.join(str(path) for path in (app_dir, PROXY_DIR) if path)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.setdefault("DCE_STOP_GRACE_SECONDS", "1")  # teardown must not wait for streams
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *gunicorn_args, app],
            cwd=PROXY_DIR, env=full_env, stdout=self._stdout, stderr=self._stderr)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer /healthz within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        """Everything the server wrote so far, stdout and stderr."""
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # gunicorn: quick shutdown
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._stderr.close()
        self._stdout.close()


@pytest.fixture
def proxy_server(fake_vllm, tmp_path):
    """proxy_server(**env) -> a running gunicorn (proxy/gunicorn.conf.py) in
    front of the fake vLLM; stopped at teardown. gunicorn_args=(...) adds to its command line."""
    started: list[ProxyServer] = []

    def _start(gunicorn_args: tuple[str, ...] = (), **overrides):
        server = ProxyServer(app_env(fake_vllm, overrides), tmp_path, gunicorn_args)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def default_proxy_server(_fake_vllm_server, tmp_path_factory):
    """One gunicorn with the base settings, shared by a module's tests."""
    server = ProxyServer(app_env(_fake_vllm_server, {}), tmp_path_factory.mktemp("proxy"))
    yield server
    server.stop()


@pytest.fixture()
def checkout(tmp_path):
    """`make up`'s copy of the checkout, with stubs (make_up.py)."""
    return make_checkout(tmp_path)
