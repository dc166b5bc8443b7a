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
# Requests vLLM finished itself, summed over its finished_reason series. vLLM 0.32 does not count a
# client's abort here (its output processor lets go of the request before counting): the stop tests
# rely on it, and would fail, not pass, if it did.
FINISHED = "vllm:request_success_total"


@dataclass(frozen=True)
class Sample:
    sent: float  # wall clock when the request left; vLLM read the values after this...
    received: float  # ...and before this
    values: dict[str, float]


# How long a test waits for vLLM to let go of a stopped stream: a bound on the wait, not a target
# (a time bound failed CI when the whole machine stalled: the sampler fell silent for 28 s). How
# long the stop took is printed, not asserted: a speed claim belongs in `make bench`.
STOP_WAIT_SECONDS = 300


def wait_for_stop(metrics: VllmMetrics, closed_at: float, where: str = "vLLM") -> None:
    """Waits until `where` has let go of one request more than it finished by itself since the
    client's disconnect at `closed_at`: the stopped stream. One it kept generating is never let go
    that way (when it ends, it counts as finished), and the wait times out; another stream that
    reaches its budget meanwhile does not blur the count. Needs RUNNING, WAITING and FINISHED sampled."""
    earlier = [sample for sample in metrics.samples if sample.received <= closed_at]
    assert earlier, f"no sample of {where}'s metrics came before the disconnect"
    before = earlier[-1]

    def let_go(sample: Sample) -> float:  # requests no longer held (running or waiting), less those finished
        held = before.values[RUNNING] + before.values[WAITING] - sample.values[RUNNING] - sample.values[WAITING]
        return held - (sample.values[FINISHED] - before.values[FINISHED])

    stopped = metrics.wait_for(lambda sample: sample.received > closed_at and let_go(sample) >= 1,
                               STOP_WAIT_SECONDS, f"{where} to let go of the stopped stream")
    # One scrape might read the gauges and the count a moment apart: the next sample must agree.
    confirmed = metrics.wait_for(lambda sample: sample.received > stopped.received, FIRST_SAMPLE_SECONDS,
                                 f"a sample of {where}'s metrics after the stop", observer=True)
    timeline = [(round(sample.sent - closed_at, 2), round(sample.received - closed_at, 2),
                 *(sample.values[name] for name in (RUNNING, WAITING, FINISHED)))
                for sample in metrics.samples if sample.received >= before.received][:40]
    assert let_go(stopped) == let_go(confirmed) == 1, (
        f"{where} did not let go of just the stopped stream; samples around the disconnect "
        f"(sent, answered, running, waiting, finished): {timeline}")
    print(f"{where} let go of the stopped stream within {stopped.received - closed_at:.2f} s")


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
