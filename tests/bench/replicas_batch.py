"""The vLLM router part of `make bench` (issue 16): one DCE batch through Caddy + proxy + the vLLM
router + two replicas of the CPU engine, against the same batch through the one-replica stack that
engine_batch.py measured just before (its median), as a ratio of total time.

It composes its own stack, project `dce-bench-replicas`, as `make up` does for VLLM_REPLICAS=2 in the
CPU profile (tests/integration/stack.py, replicas_compose). The batch is engine_batch.py's, sent by
the same client from inside the proxy container: one prompt, so the whole batch runs on one replica
(the proxy's X-Session-ID). On this machine both replicas share the same 2 cores: the ratio shows
what the router adds to a batch, not what a second GPU gives.

  .venv/bin/python tests/bench/replicas_batch.py [--rounds 3]     # the one-replica run first, ~5 minutes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import engine_batch
from engine_batch import BENCH_DIR, run_batch, stop_stack, test_stack

PROJECT = "dce-bench-replicas"
ROUNDS = 3
MINUTES = 2.5  # what run_bench.py keeps for this part: the stack's start is most of it
TITLE = "vLLM router: one DCE batch through router + 2 replicas vs through one replica (CPU engine)"


def run(one_replica_seconds: float, rounds: int = ROUNDS, deadline: float | None = None) -> list[str]:
    """Starts the replicas' stack, times `rounds` batches after a warm-up, removes the stack; returns
    the report lines. No new round starts after `deadline` (time.monotonic()), but at least one runs."""
    began = time.monotonic()
    client_code = (BENCH_DIR / "batch_client.py").read_text()
    with tempfile.TemporaryDirectory(prefix="dce-bench-replicas-") as tmp:
        print(f"router run: starting the {PROJECT} stack (router + 2 vLLM CPU engines) ...", flush=True)
        files, settings = test_stack.replicas_compose(Path(tmp))
        stack = test_stack.start_stack(Path(tmp), project=PROJECT, compose_files=files, load_keys=0,
                                       extra_settings=settings)
        started = time.monotonic() - began
        seconds = []
        try:
            print(f"  router warm-up  {run_batch(stack, 'stack', client_code)['seconds']:7.2f} s (not counted)",
                  flush=True)
            for index in range(rounds):
                if deadline is not None and index and time.monotonic() > deadline:
                    break
                seconds.append(run_batch(stack, "stack", client_code)["seconds"])
                print(f"  router round {index + 1}  {seconds[-1]:7.2f} s", flush=True)
        except BaseException:
            stop_stack(stack.compose, show_logs=True)
            raise
        stop_stack(stack.compose)
    median = statistics.median(seconds)
    return [
        f"the batch of the engine run above ({engine_batch.BATCH} streams of one prompt, max_tokens "
        f"{engine_batch.MAX_TOKENS}), through https://caddy/k/KEY/api/dce/proxy -> proxy -> vllm-router "
        "(consistent_hash) -> one of 2 replicas; both replicas on the same 2 cores",
        f"  router + 2 replicas median {median:6.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f}; "
        f"{len(seconds)} rounds)",
        f"  one replica (above)  median {one_replica_seconds:6.3f} s",
        f"  router + 2 replicas / one replica = {median / one_replica_seconds:.3f}",
        f"router part took {time.monotonic() - began:.0f} s (stack start {started:.0f} s)",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    engine_lines, one_replica = engine_batch.run(args.rounds)
    lines = run(one_replica, args.rounds)
    print()
    print(f"== {engine_batch.TITLE} ==")
    print("\n".join(engine_lines))
    print(f"== {TITLE} ==")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
