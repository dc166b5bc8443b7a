"""The one way the integration tests observe vLLM: its Prometheus metrics, sampled from inside the
backend network (vLLM publishes no port) by a sampler that proves it works before a test relies on it.

    with VllmMetrics(stack, [RUNNING, WAITING]) as metrics:
        ...  # metrics.samples grows live; metrics.wait_for(...) waits for a state

Entering waits for the first sample: if none comes, the test fails saying the observer broke,
not the product. Leaving stops the sampler.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SAMPLER = (Path(__file__).parent / "in_container" / "sample_vllm_metrics.py").read_text()
# `docker exec` and a Python start can take long on two busy cores: this bounds the observer's
# start, not anything the product does.
FIRST_SAMPLE_SECONDS = 120
# The sampler stops by itself after this long, should a test die without stopping it.
MOST_SECONDS = 900
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


@dataclass(frozen=True)
class Sample:
    sent: float  # wall clock when the request left; vLLM read the values after this...
    received: float  # ...and before this
    values: dict[str, float]


# Requests vLLM finished by itself: a stop token, the budget, an error. vLLM does not count one a
# client aborted (its output processor lets go of the request before counting it).
FINISHED = "vllm:request_success_total"
# How long a test waits for vLLM to let go of a stopped stream: a bound on the wait, not a target.
# A stream vLLM kept generating would end by itself, which FINISHED tells; how long the stop took is
# printed. (A time bound failed CI when the whole machine stalled: the sampler fell silent for 28 s.)
STOP_WAIT_SECONDS = 300


def wait_for_stop(metrics: VllmMetrics, closed_at: float) -> float:
    """Waits until vLLM holds one request fewer (running or waiting) than before the client's
    disconnect at `closed_at`, and fails if a request finished by itself meanwhile: a stream vLLM
    kept generating would end that way. Needs RUNNING, WAITING and FINISHED sampled. Returns when
    the stop showed, an upper bound of how long it took after the disconnect."""
    before = [sample for sample in metrics.samples if sample.received <= closed_at][-1]

    def held(sample: Sample) -> float:
        return sample.values[RUNNING] + sample.values[WAITING]

    after = metrics.wait_for(lambda sample: sample.received > closed_at and (
        held(sample) < held(before) or sample.values[FINISHED] > before.values[FINISHED]),
        STOP_WAIT_SECONDS, "vLLM to let go of the stopped stream")
    assert after.values[FINISHED] == before.values[FINISHED] and held(after) == held(before) - 1, \
        f"vLLM did not just drop the stopped stream: {before.values} before the stop, then {after.values}"
    delay = after.received - closed_at
    print(f"vLLM let go of the stopped stream within {delay:.2f} s")
    return delay


def idle(sample: Sample) -> bool:
    """vLLM neither runs nor queues a request: what a test that counts or times generations starts from."""
    return sample.values[RUNNING] == 0 and sample.values[WAITING] == 0


class VllmMetrics:
    def __init__(self, stack, names: list[str], *, service: str = "proxy", replica: str = "vllm"):
        self._container = stack.container(service)
        self._replica = replica
        self.names = names
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._pid: int | None = None
        self._changed = threading.Condition()

    def __enter__(self) -> VllmMetrics:
        output = self._container.exec_run(["python3", "-c", SAMPLER, *self.names, str(MOST_SECONDS)],
                                          environment={"DCE_VLLM_HOST": self._replica}, stream=True).output
        threading.Thread(target=self._collect, args=(output,), name="vllm-metrics", daemon=True).start()
        self.wait_for(lambda sample: True, FIRST_SAMPLE_SECONDS, "a first sample of vLLM's metrics",
                      observer=True)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pid is not None:
            self._container.exec_run(["python3", "-c", f"import os; os.kill({self._pid}, 15)"])

    def _collect(self, output) -> None:
        pending = b""
        for chunk in output:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._take(line)
        with self._changed:
            self.errors.append("the sampler exited")
            self._changed.notify_all()

    def _take(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = {"error": line.decode(errors="replace")}
        with self._changed:
            if "pid" in record:
                self._pid = record["pid"]
            elif "error" in record:
                self.errors.append(record["error"])
            else:
                self.samples.append(Sample(record["sent"], record["received"], record["values"]))
            self._changed.notify_all()

    def latest(self, name: str) -> float:
        return self.samples[-1].values[name]

    def wait_for(self, predicate: Callable[[Sample], bool], timeout: float, what: str, *,
                 observer: bool = False) -> Sample:
        """The first sample, from now on, for which `predicate` holds. A timeout fails the test
        naming `what` and the last samples; `observer` says it is the observer that broke."""
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = len(self.samples) - 1 if self.samples else 0
            while True:
                for sample in self.samples[seen:]:
                    if predicate(sample):
                        return sample
                seen = len(self.samples)
                left = deadline - time.monotonic()
                if left <= 0 or (observer and "the sampler exited" in self.errors):
                    break
                self._changed.wait(left)
        blame = "the vLLM metrics observer broke (not the product)" if observer else "vLLM never showed it"
        last = [sample.values for sample in self.samples[-5:]]
        raise AssertionError(f"waited {timeout:g} s for {what}: {blame}; last samples {last}, "
                             f"sampler errors {self.errors[-3:]}")
