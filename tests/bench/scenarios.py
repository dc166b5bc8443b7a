"""The scenarios of `make bench` and the runner that plays one on one path (direct, proxy, Caddy +
proxy) with its load tool: wrk for JSON requests, stream_client.py for streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loopback_stack import BENCH_DIR, SERVED_MODEL, Stack, http_get, http_request
from sampling import Sampler

CLIENT_MODEL = "local-model"
PATHS = ("direct", "proxy", "caddy")
LABELS = {"direct": "direct", "proxy": "proxy", "caddy": "caddy+proxy"}


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
