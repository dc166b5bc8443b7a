"""A proxy worker killed while it holds streams (issue 4): the other worker's streams go on, and the
dead worker's slots come back by themselves."""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path

import figures
import pytest

from dce_proxy.slots import LEASE_SECONDS
from machine import where_workers_stuck
from stack import CAP, LONG_STREAM_TOKENS
from wire import extension_body, wait_until

_KILL_BUSIEST_WORKER = (Path(__file__).parent / "in_container" / "kill_busiest_worker.py").read_text()
# Streams each worker must hold before one is killed, and events a spared stream must bring after.
_STREAMS_PER_WORKER = 2
_EVENTS_AFTER_KILL = 100


@pytest.mark.disruptive
def test_killed_proxy_worker_spares_the_other_workers_streams_and_its_slots_come_back(stack):
    body = extension_body("Keep going.", max_tokens=LONG_STREAM_TOKENS, ignore_eos=True)
    started = time.time()
    code, out = stack.exec_python(
        "proxy", _KILL_BUSIEST_WORKER, f"/k/{stack.load_keys[0]}/api/dce/proxy", json.dumps(body), str(CAP),
        str(_STREAMS_PER_WORKER), str(_EVENTS_AFTER_KILL), "dce-slots/load0")
    assert code == 0, out
    killed = json.loads(out)
    figures.add("retries", killed["dropped"])  # streams opened again to reach the other worker
    held = {int(pid): streams for pid, streams in killed["workers"].items()}
    assert len(held) == 2, held  # the test stack runs two workers
    victim = killed["victim"]
    at_kill = _streams_the_kill_tells_about(killed, stack.container("proxy").logs(since=started))
    # The precondition, checked rather than hoped for: both workers held streams when one was killed.
    per_worker = Counter(stream["worker"] for stream in at_kill)
    assert None not in per_worker and len(per_worker) == 2, f"{killed}"  # a string: pytest cuts a dict short
    assert all(count >= _STREAMS_PER_WORKER for count in per_worker.values()), \
        f"{CAP} streams did not reach both workers: {killed}"
    endings = Counter((stream["worker"] == victim, stream["ending"]) for stream in at_kill)
    # The killed worker's streams broke off; every other stream went on.
    on_victim = per_worker[victim]
    assert endings == {(True, "cut"): on_victim, (False, "continued"): len(at_kill) - on_victim}, f"{endings} {killed}"

    # A new worker takes over. The dead worker could not free its slots (they outlived it in Redis);
    # their leases lapse without anyone's help, and the key has its whole cap again.
    wait_until(stack.ready, 60, "a new proxy worker", interval=1)
    assert killed["leases_after_kill"] >= on_victim, killed["leases_after_kill"]
    wait_until(lambda: stack.live_slot_leases("load0") == 0, LEASE_SECONDS + 15, "the dead worker's slot leases to lapse",
               interval=1)
    figures.add("faults_survived", 1)
    print(f"worker {victim} killed; streams per worker { {pid: len(ids) for pid, ids in held.items()} }; "
          f"{killed['leases_after_kill']} slot leases live right after the kill, all lapsed since")


def _streams_the_kill_tells_about(killed: dict, proxy_log: bytes) -> list[dict]:
    """The streams that were open at the kill and ended by it or after it. Two other ends are not
    what the test tests, and are left out with a warning: a stream that ran its whole budget, whenever
    it did (a lone stream of it runs out in about a minute here, and placing the others on a stalled
    machine has taken that long), and one cut before the kill with a worker gunicorn stopped for a
    missed heartbeat (these machines have stalled whole stacks for a minute, issue 10). Any other
    end before the kill fails the test, with what the proxy logged meanwhile."""
    log = proxy_log.decode(errors="replace")
    ran_out = [stream for stream in killed["streams"] if _ran_its_budget(stream)]
    early = [stream for stream in killed["streams"] if stream["before_kill"] and stream not in ran_out]
    stopped = [stream for stream in early
               if stream["ending"] == "cut" and f"WORKER TIMEOUT (pid:{stream['worker']})" in log]
    unexplained = [stream for stream in early if stream not in stopped]
    assert not unexplained, (
        f"streams ended before the kill (at {killed['killed_at']} s), neither cut with a worker gunicorn "
        f"stopped nor at the end of their budget: {unexplained}\nall of them: {killed}\n"
        "the proxy's access lines meanwhile (no key, prompt or answer):\n"
        + "\n".join(line for line in log.splitlines() if '"logger": "dce_proxy.access"' in line))
    if stopped:
        warnings.warn("gunicorn stopped a proxy worker that missed its heartbeat before the kill; its streams "
                      "are left out" + "".join(f"\n{where}" for where in where_workers_stuck(log)))
    if ran_out:
        warnings.warn(f"{len(ran_out)} stream(s) ran their whole budget and are left out (the kill came at "
                      f"{killed['killed_at']} s): {killed['streams']}")
    return [stream for stream in killed["streams"] if stream not in early and stream not in ran_out]


def _ran_its_budget(stream: dict) -> bool:
    # The events are the tokens, give or take the few the proxy merges: half of them is a loose bound
    # that a stream the proxy cut short while calling it "length" would not reach.
    return stream["ending"] == "done" and stream["finish_reason"] == "length" and stream["events"] >= LONG_STREAM_TOKENS // 2
