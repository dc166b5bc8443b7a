"""The real-engine run of `make bench` (issue 5): one DCE batch through the whole stack against the
same batch sent straight to vLLM, as a ratio of total time (target: through the stack within 2 %).

It composes its own stack, project `dce-bench` (the integration suite's is `dce-test`: both may run at
once): compose.yaml + compose.cpu.yaml + compose.test.yaml, set up as tests/integration/stack.py does
it (local images, a key file and an empty HF token as secrets), so vLLM is the CPU engine with the tiny
model. vLLM publishes no port, so batch_client.py runs inside the proxy container for both paths:
  - direct: http://vllm:8000/v1/chat/completions, with the body the proxy would send (model "tiny");
  - stack:  https://caddy:443/k/KEY/api/dce/proxy over the edge network (TLS verified against Caddy's
            root, for the name localhost) -> proxy -> vLLM: what the extension sends, key in the URL.
A batch is what the DCE extension v1.2.0 sends (tests/wire.py): 10 streamed chat
requests at once, n=1 each, of one prompt. Each also carries seed i, ignore_eos and a fixed max_tokens,
so that both paths make vLLM generate the very same tokens. After one unmeasured warm-up batch per path,
the paths alternate (the order swaps every round). The stack is removed at the end (down -v), also on failure.

  .venv/bin/python tests/bench/engine_batch.py [--rounds 5]     # about 3 minutes, 1.5 of them starting the stack

Needs Docker and the local images (scripts/ensure-docker.sh, `make images`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from testcontainers.compose import DockerCompose

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
# The integration suite's stack set-up and extension client, reused as they are (pytest.ini's paths).
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "integration")]
import stack as test_stack  # noqa: E402
from wire import extension_body, read_extension_body, sse_events  # noqa: E402
from sampling import CPUS, TICK, read_machine_ticks  # noqa: E402

PROJECT = "dce-bench"
# The default deployment on a CPU host (`make up`: one proxy worker) with the test override's random
# ports; not the suite's COMPOSE_FILES, which may add optional files its tests need.
COMPOSE_FILES = ["compose.yaml", "compose.cpu.yaml", "compose.test.yaml"]
LOCK = Path(tempfile.gettempdir()) / f"{PROJECT}.lock"
PATHS = ("direct", "stack")
SERVICES = ("vllm", "proxy", "caddy")
BATCH = 10
MAX_TOKENS = 512  # 3-4 s per batch with the tiny model on a 2-core machine
ROUNDS = 5
TARGET_RATIO = 1.02
MINUTES = 3.0  # what run_bench.py keeps for this part (it takes ~3; the budget ends 1 minute before make bench must)
TITLE = "real engine: one DCE batch through Caddy + proxy vs straight to vLLM (composed stack, CPU engine)"
SERVED_MODEL = "tiny"  # compose.cpu.yaml's served model name: what the proxy maps "local-model" to
PROMPT = ("# prompt.md\nYou curate this repository with the Data Curation Environment. Read the files "
          "below, then write a plan to split the proxy into modules, with the tests each step needs.\n\n"
          "## proxy/dce_proxy/relay.py\nTurning vLLM's answer into the client's: JSON bodies, raw SSE "
          "pass-through, or SSE rewritten per event.\n")


@contextmanager
def only_run():
    """One engine run at a time on this machine: a second one would remove the first one's stack (it
    clears what a killed run left behind), and both would measure a shared CPU."""
    with open(LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another engine run holds {LOCK}: its {PROJECT} stack is left alone") from None
        yield


def batch_bodies(path: str) -> list[dict]:
    bodies = [extension_body(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, seed=i) for i in range(BATCH)]
    if path == "direct":
        for body in bodies:
            body["model"] = SERVED_MODEL  # vLLM answers 404 to "local-model": mapping it is the proxy's job
    return bodies


def stop_stack(compose: DockerCompose, show_logs: bool = False) -> None:
    if show_logs:
        stdout, stderr = compose.get_logs()
        print(f"--- dce-bench stack logs ---\n{stdout[-20000:]}\n{stderr[-5000:]}", flush=True)
    compose.stop()  # down --volumes


def cpu_seconds(stack: test_stack.Stack) -> dict[str, float]:
    """CPU time used so far by each container (batch_client.py runs in the proxy's, so it counts there)
    and by the whole machine, and the wall clock."""
    def used(service: str) -> float:
        stats = stack.container(service).stats(stream=False, one_shot=True)
        return stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9

    # Docker answers at its next collection tick (up to a second): ask for the three at once.
    with ThreadPoolExecutor(len(SERVICES)) as pool:
        seconds = dict(zip(SERVICES, pool.map(used, SERVICES)))
    total, idle = read_machine_ticks()
    seconds.update(machine=(total - idle) / TICK, wall=time.monotonic())
    return seconds


def read_stack(stream: dict) -> dict:
    """What the extension shows of a stream through the stack (its own rules, tests/wire.py)."""
    shown = read_extension_body(stream.pop("body"), stream["status"])
    return {"text": (shown.reasoning, shown.content), "finish_reason": shown.finish_reason,
            "errors": [shown.failure] if shown.failure else []}


def read_direct(stream: dict) -> dict:
    """What vLLM generated: every delta of choice 0 joined, the finishing chunk's included."""
    reasoning, content, finish_reason, errors = "", "", None, []
    for data in sse_events(stream.pop("body")):
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            errors.append(chunk["error"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning += delta.get("reasoning") or ""
            content += delta.get("content") or ""
            finish_reason = choice.get("finish_reason") or finish_reason
    return {"text": (reasoning, content), "finish_reason": finish_reason, "errors": errors}


def run_batch(stack: test_stack.Stack, path: str, client_code: str) -> dict:
    env = {"BATCH_BODIES": json.dumps(batch_bodies(path))}
    if path == "direct":
        env["BATCH_URL"] = "http://vllm:8000/v1/chat/completions"
    else:
        env.update(BATCH_URL=f"https://caddy:443/k/{stack.key}/api/dce/proxy", BATCH_CA=Path(stack.ca_file).read_text())
    cpu_before = cpu_seconds(stack)
    done = stack.container("proxy").exec_run(["python3", "-c", client_code], environment=env)
    cpu_after = cpu_seconds(stack)
    output = done.output.decode(errors="replace")
    if done.exit_code != 0:
        raise RuntimeError(f"batch_client.py ({path}) exited with {done.exit_code}: {output[-1500:]}")
    result = json.loads(output.strip().splitlines()[-1])
    for stream in result["streams"]:
        stream.update(read_stack(stream) if path == "stack" else read_direct(stream))
    failed = [s for s in result["streams"] if s["status"] != 200 or s["errors"] or s["finish_reason"] != "length"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {BATCH} {path} streams failed, first: {failed[0]}")
    result["cpu"] = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
    return result


def measure(stack: test_stack.Stack, rounds: int, deadline: float | None) -> tuple[dict[str, list[dict]], int]:
    """Warm-up batches, then the rounds; returns each path's measured batches and the rounds skipped."""
    client_code = (BENCH_DIR / "batch_client.py").read_text()
    for path in PATHS:
        seconds = run_batch(stack, path, client_code)["seconds"]
        print(f"  engine warm-up   {path:<7}{seconds:7.2f} s (not counted)", flush=True)
    results: dict[str, list[dict]] = {path: [] for path in PATHS}
    for index in range(rounds):
        if deadline is not None and index and time.monotonic() > deadline:
            return results, rounds - index
        for path in PATHS[index % 2:] + PATHS[:index % 2]:
            result = run_batch(stack, path, client_code)
            results[path].append(result)
            print(f"  engine round {index + 1}  {path:<7}{result['seconds']:7.2f} s, "
                  f"{result['generated_tokens']:.0f} tokens generated, machine "
                  f"{result['cpu']['machine'] / result['cpu']['wall']:.1f} of {CPUS} cores busy", flush=True)
    return results, 0


def same_work(results: dict[str, list[dict]]) -> str:
    """Whether every batch made vLLM generate the same tokens, and the same texts on both paths."""
    tokens = {path: sorted({round(r["generated_tokens"]) for r in batches}) for path, batches in results.items()}
    texts = {path: {tuple(s["text"] for s in r["streams"]) for r in batches} for path, batches in results.items()}
    if tokens["direct"] == tokens["stack"] and len(tokens["direct"]) == 1:
        line = f"same work on both paths: {tokens['direct'][0]:,} tokens generated per batch (vLLM's counter)"
    else:
        line = f"!! token counts differ (vLLM's counter, per batch): direct {tokens['direct']}, stack {tokens['stack']}"
    identical = texts["direct"] == texts["stack"] and len(texts["direct"]) == 1
    return line + ("; texts identical" if identical else "; !! texts differ between batches or paths")


def report(results: dict[str, list[dict]], skipped: int, took: dict[str, float]) -> list[str]:
    seconds = {path: [r["seconds"] for r in batches] for path, batches in results.items()}
    medians = {path: statistics.median(values) for path, values in seconds.items()}
    ratio = medians["stack"] / medians["direct"]
    added_pct, target_pct = 100 * (ratio - 1), 100 * (TARGET_RATIO - 1)
    verdict = "met" if ratio <= TARGET_RATIO else f"MISSED by {added_pct - target_pct:.1f} points"
    rounds = len(seconds["direct"])
    lines = [
        f"one DCE batch = {BATCH} concurrent streams (the extension's body, n=1 each) + seed i, ignore_eos, "
        f"max_tokens {MAX_TOKENS}; vLLM CPU engine, tiny model; client: batch_client.py inside the proxy container "
        "for both paths (same code, same place; the host's port forwarding is not in either path)",
        "direct = http://vllm:8000/v1/chat/completions; stack = https://caddy:443/k/KEY/api/dce/proxy "
        "(TLS verified, name localhost) -> proxy -> vLLM; time = first connection opened -> last stream ended",
    ]
    for path in PATHS:
        cpu = {name: statistics.median(r["cpu"][name] for r in results[path]) for name in results[path][0]["cpu"]}
        other = max(0.0, cpu["machine"] - sum(cpu[service] for service in SERVICES))
        lines.append(f"  {path:<7} median {medians[path]:6.3f} s  (min {min(seconds[path]):.3f}, "
                     f"max {max(seconds[path]):.3f}; {rounds} rounds); CPU s per batch: "
                     + ", ".join(f"{service} {cpu[service]:.2f}" for service in SERVICES)
                     + f", other {other:.2f} (machine {cpu['machine'] / cpu['wall']:.1f} of {CPUS} cores busy)")
    lines.append(f"  stack / direct = {ratio:.3f} ({added_pct:+.1f} %); target <= +{target_pct:.0f} %: {verdict}")
    lines.append(same_work(results))
    lines.append("CPU s: medians, from just before each docker exec to just after it (the timed batch plus the "
                 "client's start and counter reads); the proxy's includes the client; other = the rest of the machine")
    if skipped:
        lines.append(f"!! time budget reached: {skipped} of {rounds + skipped} rounds skipped")
    lines.append(f"engine part took {took['total']:.0f} s (stack start {took['start']:.0f} s, "
                 f"removal {took['stop']:.0f} s)")
    return lines


def run(rounds: int = ROUNDS, deadline: float | None = None) -> tuple[list[str], float]:
    """Starts the stack, measures, removes the stack; returns the report lines and the median seconds
    of a batch through the stack. No new round starts after `deadline` (time.monotonic()), but at
    least one runs."""
    began = time.monotonic()
    with only_run(), tempfile.TemporaryDirectory(prefix="dce-bench-engine-") as tmp:
        print(f"engine run: starting the {PROJECT} stack (vLLM CPU engine) ...", flush=True)
        stack = test_stack.start_stack(Path(tmp), project=PROJECT, compose_files=COMPOSE_FILES, load_keys=0)
        took = {"start": time.monotonic() - began}
        try:
            results, skipped = measure(stack, rounds, deadline)
        except BaseException:
            stop_stack(stack.compose, show_logs=True)
            raise
        stopping = time.monotonic()
        stop_stack(stack.compose)
    took.update(stop=time.monotonic() - stopping, total=time.monotonic() - began)
    return report(results, skipped, took), statistics.median(r["seconds"] for r in results["stack"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="One DCE batch through Caddy + proxy vs straight to vLLM (CPU).")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="measured rounds, after one warm-up per path")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    lines, _ = run(args.rounds)
    print()
    print(f"== {TITLE} ==")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
