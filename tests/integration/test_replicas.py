"""More than one vLLM (issue 16): two replicas of the CPU engine behind the vLLM router, through Caddy
and the proxy, composed as `make up` composes them for VLLM_REPLICAS=2 (scripts/replicas.py).

The stack is this module's own (project dce-replicas, one proxy worker), started beside the suite's."""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from stack import LONG_STREAM_TOKENS, REPO, remove_stack, replicas_compose, start_stack
from vllm_metrics import FINISHED, RUNNING, WAITING, VllmMetrics, wait_for_stop
from wire import extension_body, open_held_tab, wait_until

sys.path.insert(0, str(REPO / "scripts"))
from replicas import replica_names  # noqa: E402

PROJECT = "dce-replicas"
REPLICAS = replica_names(2)
REPLICA_COUNTS = (Path(__file__).parent / "in_container" / "replica_counts.py").read_text()
PREFIX_HITS = "vllm:prefix_cache_hits_total"
BATCH = 10  # the extension's tabs of one prompt
# Many times vLLM's block of 16 tokens: the batch's later streams find the first's blocks cached.
PROMPT = "Review these files for bugs and explain each finding with the line it is on. " * 12
# The router checks each replica every 5 s and drops one after two failures (compose.router.yaml);
# a restarted CPU engine loads in about a minute on a busy machine.
FAILOVER_SECONDS = 120
RETURN_SECONDS = 300


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    files, settings = replicas_compose(tmp, len(REPLICAS))
    stack = start_stack(tmp, project=PROJECT, compose_files=files, load_keys=0, extra_settings=settings)
    yield stack
    remove_stack(stack.compose)


def _counts(stack, metric: str) -> dict[str, float | None]:
    code, out = stack.exec_python("proxy", REPLICA_COUNTS, metric, *REPLICAS)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def _url(stack) -> str:
    return f"{stack.base}/k/{stack.key}/api/dce/proxy"


def _body(prompt: str, later_turn: str | None = None) -> dict:
    """A short generation of `prompt`; or the conversation's next turn, after an answer."""
    body = extension_body(prompt, max_tokens=8)
    if later_turn is not None:
        body["messages"] += [{"role": "assistant", "content": "Done."}, {"role": "user", "content": later_turn}]
    return body


def _batch(stack, body: dict, size: int = BATCH) -> list:
    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(lambda _: open_held_tab(stack.session, _url(stack), body), range(size)))


def _ran_on(stack, body: dict, size: int = BATCH) -> dict[str, float]:
    """Sends a batch of `body`; how many of its generations each replica completed."""
    before = _counts(stack, FINISHED)
    results = _batch(stack, body, size)
    failed = [result.failure or result.finish_reason for result in results
              if result.failure or result.finish_reason != "length"]
    assert not failed, failed
    moved = {}

    def all_counted() -> bool:
        after = _counts(stack, FINISHED)
        moved.update({name: (after[name] or 0) - (before[name] or 0) for name in REPLICAS})
        return sum(moved.values()) >= size

    wait_until(all_counted, 60, f"the replicas to count the batch's {size} generations", interval=0.5,
               state=lambda: moved)
    return moved


def test_a_batch_and_its_later_turns_run_on_one_replica_which_reuses_the_prompt(replicas):
    hits_before = _counts(replicas, PREFIX_HITS)
    moved = _ran_on(replicas, _body(PROMPT))
    assert sorted(moved.values()) == [0, BATCH], moved
    home = max(moved, key=moved.get)
    hits = _counts(replicas, PREFIX_HITS)
    assert hits[home] > hits_before[home], (hits_before, hits)
    # Each later turn is another body, which the router alone (its fallback hashes the whole body)
    # would send to either replica: four all on one by chance would be odds of 1 in 16.
    for turn in ("Why?", "Show the fix.", "Any other bug?", "Summarise."):
        assert _ran_on(replicas, _body(PROMPT, later_turn=turn), size=1)[home] == 1, turn
    # The router logs no line per request: not the conversations' ids either.
    assert b"session" not in replicas.container("vllm-router").logs().lower()


def test_another_prompt_can_run_on_the_other_replica(replicas):
    seen = {}
    for index in range(24):  # each prompt picks a replica by its hash: 24 all alike is odds of 2^-23
        prompt = f"Prompt {index}: list the modules of the repository."
        moved = _ran_on(replicas, _body(prompt), size=1)
        seen[max(moved, key=moved.get)] = prompt
        if len(seen) == len(REPLICAS):
            break
    assert len(seen) == len(REPLICAS), seen


def _home(stack, prompt: str) -> str:
    moved = _ran_on(stack, _body(prompt), size=1)
    return max(moved, key=moved.get)


def test_a_stopped_tab_frees_its_generation_on_the_replica_that_runs_it(replicas):
    prompt = "Write at length about the repository."
    home = _home(replicas, prompt)
    body = extension_body(prompt, max_tokens=LONG_STREAM_TOKENS, ignore_eos=True)
    stop = [threading.Event() for _ in range(3)]
    closed_at = {}

    def run(index):
        def on_chunk(result):
            if stop[index].is_set():
                closed_at.setdefault(index, time.time())
                return False
            return True

        return open_held_tab(replicas.session, _url(replicas), body, on_chunk=on_chunk)

    with VllmMetrics(replicas, [RUNNING, WAITING, FINISHED], replica=home) as metrics, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, index) for index in range(3)]
        try:
            metrics.wait_for(lambda sample: sample.values[RUNNING] == 3, 120, f"3 generations running on {home}")
            ended = [future.result() for future in futures if future.done()]
            assert not ended, f"tabs ended before the stop: {ended}"
            stop[0].set()
            stopped = futures[0].result()  # its connection is closed
            assert 0 in closed_at, f"tab 0 ended before its stop: {stopped}"
            wait_for_stop(metrics, closed_at[0], home)
            # The stop was that tab's alone: the other two still stream.
            ended = [future.result() for future in futures[1:] if future.done()]
            assert not ended, f"other tabs ended with the stopped one: {ended}"
        finally:
            for event in stop:
                event.set()
        wait(futures, timeout=120)
        metrics.wait_for(lambda sample: sample.values[RUNNING] == 0, 60, f"{home} to run nothing")


def test_a_killed_replica_ends_its_streams_visibly_the_other_takes_over_and_it_comes_back(replicas):
    prompt = "Keep going about the repository."
    home = _home(replicas, prompt)
    other = next(name for name in REPLICAS if name != home)
    body = extension_body(prompt, max_tokens=LONG_STREAM_TOKENS, ignore_eos=True)
    streaming = [threading.Event() for _ in range(3)]

    def run(index):
        def on_chunk(result):
            if result.chunks:
                streaming[index].set()
            return True

        try:
            return open_held_tab(replicas.session, _url(replicas), body, on_chunk=on_chunk)
        finally:
            streaming[index].set()

    victim = replicas.container(home)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, index) for index in range(3)]
        try:
            wait_until(lambda: all(event.is_set() for event in streaming), 120, "the streams to start")
            victim.kill()
            _, still_open = wait(futures, timeout=60)
            assert not still_open, "streams still open 60 s after their replica was killed"
        finally:
            victim.reload()
        for result in (future.result() for future in futures):
            # The extension shows the reason in the tab, then closes it.
            assert result.status == 200 and result.finish_reason == "error", (result.finish_reason, result.failure)
            assert "[DCE proxy error:" in result.content, result.content[-300:]

    # The router stops sending the conversation to the dead replica within its health checks.
    def served_elsewhere() -> bool:
        results = _batch(replicas, _body(prompt), size=1)
        return not results[0].failure and results[0].finish_reason == "length"

    wait_until(served_elsewhere, FAILOVER_SECONDS, f"the conversation of the killed {home} to run on {other}",
               interval=2)
    moved = _ran_on(replicas, _body(prompt))
    assert moved[other] == BATCH, moved

    victim.start()  # what its restart policy does after a crash (Docker's does not, after an API kill)
    wait_until(lambda: _home(replicas, prompt) == home, RETURN_SECONDS, f"{home} to take its conversation back",
               interval=5)
