"""The report of `make bench`: medians over the rounds, the table of every scenario on the three
paths with their ratios to direct, and the targets met or missed (by how much)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from sampling import CPUS
from scenarios import LABELS, PATHS, Scenario


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


def count_access_lines(log: Path) -> int:
    count = 0
    with open(log, "rb") as handle:
        for line in handle:
            if b'"logger": "dce_proxy.access"' in line:
                count += 1
    return count
