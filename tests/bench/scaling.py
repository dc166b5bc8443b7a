"""`make bench`'s worker scaling: the same two loads through the proxy alone with DCE_PROXY_WORKERS =
1, 2, 4 ..., each count on a stack of its own (from 2 workers on, their limits shared in a Redis of
their own, as compose.scale.yaml deploys them). The loads share the machine's cores with the proxy,
so the growth it shows is bounded by the cores left to the proxy, not only by the proxy."""

from __future__ import annotations

from typing import Callable, Protocol


class _Stack(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def measure(counts: list[int], make_stack: Callable[[int], _Stack], run: Callable[[_Stack, object], dict],
            json_load, streams_load, cpus: int) -> list[str]:
    """One run of each load per worker count; the lines of a table (ratios to the first count)."""
    rows = []
    for workers in counts:
        stack = make_stack(workers)
        try:
            stack.start()
            # Unmeasured: a fresh worker's first streams also open its connections to the upstream.
            run(stack, streams_load)
            rows.append((workers, run(stack, json_load), run(stack, streams_load)))
        finally:
            stack.stop()
    first_rps = rows[0][1].get("rps") or 0
    lines = [f"{cpus} CPUs, shared by the proxy, the fake upstream and the load tool; one run each, after an "
             "unmeasured stream run.",
             f"{'workers':>7}  {'JSON c=32 req/s':>16} {'(x ' + str(counts[0]) + ')':>7}  "
             f"{'streams open at once':>21}  {'TTFT p99 ms':>12}  {'errors':>6}  {'proxy CPU %':>11}"]
    for workers, json_result, streams_result in rows:
        rps = json_result.get("rps") or 0
        errors = (json_result.get("errors") or 0) + (streams_result.get("errors") or 0)
        ttft = streams_result.get("ttft_p99_ms")
        lines.append(f"{workers:>7}  {rps:>16,.0f} {'x%.2f' % (rps / first_rps) if first_rps else '-':>7}  "
                     f"{streams_result.get('open_at_once') or 0:>14,} of {streams_load.connections:<4,}  "
                     f"{'-' if ttft is None else f'{ttft:,.0f}':>12}  {errors:>6}  "
                     f"{json_result.get('cpu', {}).get('proxy', 0):>11.0f}")
    lines.append("(proxy CPU %: during the JSON run, 100 = one core)")
    return lines
