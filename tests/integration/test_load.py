"""200 concurrent streams through Caddy for over a minute: no error, and every stream's text is
byte-identical to what vLLM itself streams for the same greedy request (issue 4).

Each of the 200 clients streams again as soon as its stream ends, until the minute is over, so
the load lasts a minute however fast the engine is."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import figures
from dce_proxy.slots import LEASE_SECONDS

from wire import extension_body, post_like_extension, wait_until

STREAMS = 200
PROMPTS = 8  # distinct prompts, so a stream that got another's tokens shows
HOLD_SECONDS = 60
MAX_TOKENS = 300  # about 30 s per stream with 200 at once on this CPU


def _body(index: int, *, for_vllm: bool = False) -> dict:
    prompt = f"Prompt {index}: describe file number {index * 7919} of the repository."
    # Greedy and ignore_eos: the CPU engine then gives the same text every time, at full length.
    body = extension_body(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)
    if for_vllm:
        body["model"] = "tiny"
    return body


def _failures(timeline: list, proxy_log: str) -> str:
    """When and how far the failed streams got: whether a stall hit streams opened together, before or
    after their answer's headers, and before or after their first token; and what the proxy logged
    (a request it never answered has no access line; its warnings and errors, each once)."""
    ended = Counter()
    worst_ttft = {}
    notes = Counter()
    for line in proxy_log.splitlines():
        try:
            entry = json.loads(line.split("| ", 1)[-1])
        except ValueError:
            if "[ERROR]" in line or "[WARNING]" in line or "[CRITICAL]" in line:
                notes[line.split("] ", 3)[-1][:160]] += 1
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("logger") == "dce_proxy.access" and str(entry.get("key_id", "")).startswith("load"):
            ended[(entry.get("status"), entry.get("outcome"), entry.get("worker"))] += 1
            worst_ttft[entry.get("worker")] = max(worst_ttft.get(entry.get("worker"), 0), entry.get("ttft_ms") or 0)
        elif entry.get("level") in ("warning", "error", "critical"):
            notes[str(entry.get("message"))[:160]] += 1
    lines = [f"proxy's access lines (status, outcome, worker): {dict(ended)}; worst TTFT per worker (ms): "
             f"{worst_ttft}; its warnings and errors: {dict(notes) or 'none'}"]
    for opened, ended, client, result in sorted(timeline, key=lambda row: row[0]):
        if result.status != 200 or result.failure:
            lines.append(f"  client {client:3d}: opened at {opened:5.1f} s, failed at {ended:5.1f} s, "
                         f"status {result.status}, {result.chunks} chunks, {result.heartbeats} heartbeats: "
                         f"{result.failure}" + (f" ({result.timed_out})" if result.timed_out else ""))
    return "\n".join(lines)


def test_200_streams_for_a_minute_lose_nothing(stack):
    reference = {}

    def direct():
        reference["answers"] = stack.direct_answers([_body(i, for_vllm=True) for i in range(PROMPTS)])

    def client(index: int) -> list[tuple[int, object]]:
        # Ten curators, each within their DCE_MAX_CONCURRENT of 20.
        key = stack.load_keys[index % len(stack.load_keys)]
        url = f"{stack.base}/k/{key}/api/dce/proxy"
        results = []
        with stack.session() as session:
            while time.monotonic() - started < HOLD_SECONDS:
                opened = time.monotonic() - started
                result = post_like_extension(session, url, _body(index % PROMPTS))
                timeline.append((opened, time.monotonic() - started, index, result))
                results.append((index % PROMPTS, result))
        return results

    timeline = []  # (opened, ended, client, result): what a failure report shows
    started = time.monotonic()
    # The direct streams run in the same window, so vLLM batches both alike.
    reference_thread = threading.Thread(target=direct)
    reference_thread.start()
    with ThreadPoolExecutor(STREAMS) as pool:
        results = [result for per_client in pool.map(client, range(STREAMS)) for result in per_client]
    held = time.monotonic() - started
    reference_thread.join(timeout=600)

    expected = reference["answers"]
    errors = [result.failure for _, result in results if result.status != 200 or result.failure]
    assert not errors, f"{len(errors)} of {len(results)} streams failed, first: {errors[0]}\n" + _failures(
        timeline, stack.container("proxy").logs(since=int(time.time() - held - 5)).decode(errors="replace"))
    compared = 0
    for prompt, result in results:
        assert result.finish_reason == "length" and result.saw_done
        shown = {"content": result.content, "reasoning": result.reasoning}
        assert shown == expected[prompt], f"a stream of prompt {prompt} differs from vLLM's own text"
        compared += len(result.content.encode()) + len(result.reasoning.encode())
    # Every slot came back: a lease still renewed now belongs to a stream the proxy lost track of.
    keys = [f"load{i}" for i in range(len(stack.load_keys))]
    wait_until(lambda: not any(stack.live_slot_leases(key) for key in keys), LEASE_SECONDS + 15,
               "every slot of the load to come back", interval=1,
               state=lambda: {key: stack.live_slot_leases(key) for key in keys})
    figures.add("stream_seconds", STREAMS * held)
    figures.add("bytes_compared", compared)
