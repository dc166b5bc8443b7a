"""SSE load client for the benchmark (`make bench`): many HTTP/1.1 streams, timed per event.

Light on purpose, so that it is not the bottleneck: raw HTTP/1.1 over asyncio Protocols (uvloop
when installed), no HTTP library, no JSON parsing while streams run (events are counted by their
`data: {` prefix), the garbage collector off during the run. TLS (for the Caddy path) uses `ssl`
with the given CA file and full verification (certificate chain and host name).

Each of `--connections` connections is opened first, then all send their request at once (or
`--stagger-ms` apart, so that the starts of independent users spread out) and run
`--streams-per-connection` streams one after another (keep-alive). Per stream it records:
  TTFT    request written -> first read holding an event
  gaps    time between two reads that hold events (events that came in the same read count as
          gaps of 0 and as "coalesced")
  total   request written -> end of the response (last chunk)
Every stream's tokens are checked to come whole and in order (the fake upstream numbers them
" tok0", " tok1", ...): an event lost, doubled or reordered is an error.
Then it prints one JSON line of summary numbers on stdout (times in ms) and exits.

With --extension each stream is exactly what the DCE extension v1.2.0 sends: its body
(n 1, reasoning_effort "medium"), the key in the path (/k/KEY/api/dce/proxy), only a Content-Type
header; and the proxy sends one event more than the tokens (the last token's chunk split in two).

Run: python stream_client.py --url https://localhost:8443 --cafile root.crt --key KEY \
        --connections 32 --streams-per-connection 6 --tokens 64 --interval-ms 5

One file of over 300 lines on purpose: it runs as a process of its own, started by run_bench.py,
and its timing loop and what it counts are read together.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import re
import resource
import ssl
import sys
import time
from urllib.parse import urlsplit

EVENT = b"data: {"
ERROR_EVENT = b'data: {"error"'
DONE = b"data: [DONE]"
TAIL = 16  # longer than any marker above, so a marker split over two reads is still seen once
TOKEN = re.compile(rb"tok(\d+)")
now = time.perf_counter


class Dechunker:
    """Body bytes out of HTTP/1.1 chunked framing fed in arbitrary pieces (a proxy or Caddy may
    split one event over two chunks, and a chunk-size line must then not break an event's marker)."""

    def __init__(self):
        self.pending = b""
        self.data_left = 0  # bytes of the current chunk still to come
        self.crlf_left = 0  # the CRLF after a chunk's data
        self.ended = False  # the zero-size last chunk was seen

    def feed(self, data: bytes) -> bytes:
        buf = self.pending + data
        out = []
        pos = 0
        while pos < len(buf) and not self.ended:
            if self.data_left:
                take = min(self.data_left, len(buf) - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.data_left -= take
                self.crlf_left = 0 if self.data_left else 2
            elif self.crlf_left:
                take = min(self.crlf_left, len(buf) - pos)
                pos += take
                self.crlf_left -= take
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                self.ended = size == 0
                self.data_left = size
        self.pending = buf[pos:]
        return b"".join(out)


class StreamResult:
    __slots__ = ("sent", "reads", "ended", "status", "error", "next_token", "unread")

    def __init__(self, sent: float):
        self.sent = sent
        self.reads: list[tuple[float, int]] = []  # (arrival time, events in that read)
        self.ended = 0.0
        self.status = 0
        self.error = ""
        self.next_token = 0  # the number the next token must carry
        self.unread = b""  # the start of an event whose end has not come yet

    def check_order(self, body: bytes) -> None:
        """Each token of the stream exactly once, in order, over whole events."""
        body = self.unread + body
        end = body.rfind(b"\n\n") + 2
        self.unread = body[end:] if end >= 2 else body
        for number in TOKEN.findall(body[:end] if end >= 2 else b""):
            if int(number) != self.next_token and not self.error:
                self.error = "a token lost, doubled or out of order"
            self.next_token = int(number) + 1


class StreamConnection(asyncio.Protocol):
    def __init__(self, loop):
        self.loop = loop
        self.transport = None
        self.waiter: asyncio.Future | None = None
        self.result: StreamResult | None = None
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = True
        self._finish(f"connection closed ({exc or 'EOF'})")

    def begin(self, request: bytes) -> asyncio.Future:
        self.waiter = self.loop.create_future()
        self.head = b""
        self.in_head = True
        self.tail = b""
        self.seen_done = False
        self.body_left = -1
        self.dechunker = Dechunker()
        self.result = StreamResult(now())
        self.transport.write(request)
        return self.waiter

    def _finish(self, error: str = ""):
        if self.waiter is not None and not self.waiter.done():
            self.result.ended = now()
            self.result.error = self.result.error or error
            self.waiter.set_result(self.result)

    def data_received(self, data: bytes):
        arrived = now()
        result = self.result
        if result is None or self.waiter is None or self.waiter.done():
            return
        if self.in_head:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.head[:end].lower()
            data = self.head[end + 4:]
            self.in_head = False
            try:
                result.status = int(head[9:12])
            except ValueError:
                result.status = -1
            if result.status != 200 or b"transfer-encoding: chunked" not in head:
                # An error answer (or a non-stream body): read it to its end and report it.
                result.error = f"HTTP {result.status}"
                marker = b"content-length:"
                at = head.find(marker)
                self.body_left = int(head[at + len(marker):].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if self.body_left >= 0:
            self.body_left -= len(data)
            if self.body_left <= 0:
                self._finish()
            return
        body = self.dechunker.feed(data)
        result.check_order(body)
        joined = self.tail + body
        events = joined.count(EVENT) - self.tail.count(EVENT)
        if events:
            result.reads.append((arrived, events))
            if ERROR_EVENT in joined:
                result.error = "error event in the stream"
        if not self.seen_done and joined.count(DONE) > self.tail.count(DONE):
            self.seen_done = True
        self.tail = joined[-TAIL:]
        if self.dechunker.ended:
            self._finish("" if self.seen_done else "stream ended without [DONE]")


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))  # nearest rank
    return ordered[rank]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals]
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def build_request(host: str, path: str, key: str, body: dict, extension: bool) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = ("Content-Type: application/json\r\n" if extension else
               f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n")
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def run(args) -> dict:
    loop = asyncio.get_running_loop()
    url = urlsplit(args.url)
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    context = None
    if tls:
        context = ssl.create_default_context(cafile=args.cafile)  # verifies chain and host name
        context.set_alpn_protocols(["http/1.1"])
    host_header = url.netloc
    body = {"model": args.model, "messages": [{"role": "user", "content": "Benchmark: say something."}],
            "max_tokens": args.tokens, "stream": True, "bench_interval_ms": args.interval_ms}
    path = args.path
    if args.extension:
        body.update(n=1, reasoning_effort="medium")
        path = f"/k/{args.key}/api/dce/proxy"
    request = build_request(host_header, path, args.key, body, args.extension)

    connect_started = now()
    connect_errors: list[str] = []

    async def connect():
        try:
            _, protocol = await asyncio.wait_for(loop.create_connection(
                lambda: StreamConnection(loop), url.hostname, port, ssl=context,
                server_hostname=url.hostname if tls else None), args.timeout)
            return protocol
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            connect_errors.append(type(exc).__name__ + ": " + str(exc))
            return None

    connections = [c for c in await asyncio.gather(*(connect() for _ in range(args.connections))) if c]
    connect_seconds = now() - connect_started

    results: list[StreamResult] = []
    deadline = now() + args.timeout

    async def drive(connection: StreamConnection, position: int):
        if args.stagger_ms:
            await asyncio.sleep(position * args.stagger_ms / 1000)
        for _ in range(args.streams_per_connection):
            if connection.lost:
                return
            waiter = connection.begin(request)
            try:
                result = await asyncio.wait_for(waiter, max(0.1, deadline - now()))
            except asyncio.TimeoutError:
                result = connection.result
                result.error = result.error or "timed out"
                result.ended = now()
                results.append(result)
                connection.transport.close()
                return
            results.append(result)
            if result.error:
                return

    gc.disable()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = now()
    await asyncio.gather(*(drive(connection, position) for position, connection in enumerate(connections)))
    wall = now() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    gc.enable()
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()

    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    return summarize(args, results, connect_errors, connect_seconds, wall, cpu)


def summarize(args, results: list[StreamResult], connect_errors, connect_seconds, wall, cpu) -> dict:
    ttfts, totals, gaps, intervals = [], [], [], []
    errors: dict[str, int] = {}
    events = coalesced = complete = 0
    expected = args.tokens + 1 if args.extension else args.tokens
    for result in results:
        count = sum(n for _, n in result.reads)
        if not result.error and result.next_token != args.tokens:
            result.error = "tokens missing at the end"
        if result.error or count != expected:
            reason = result.error or f"{count} of {expected} events"
            errors[reason] = errors.get(reason, 0) + 1
        else:
            complete += 1
        if not result.reads:
            continue
        events += count
        ttfts.append(result.reads[0][0] - result.sent)
        totals.append(result.ended - result.sent)
        intervals.append((result.reads[0][0], result.reads[-1][0]))
        previous = result.reads[0][0]
        for position, (arrived, n) in enumerate(result.reads):
            if position:
                gaps.append(arrived - previous)
            gaps.extend([0.0] * (n - 1))
            coalesced += n - 1
            previous = arrived
    for error in connect_errors:
        errors[error] = errors.get(error, 0) + 1
    ms = 1000.0

    def pct(values, p):
        value = percentile(values, p)
        return None if value is None else round(value * ms, 3)

    return {
        "streams_wanted": args.connections * args.streams_per_connection,
        "streams_complete": complete,
        "errors": errors,
        "events": events,
        "coalesced_events": coalesced,
        "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99), "ttft_max_ms": pct(ttfts, 100),
        "gap_p50_ms": pct(gaps, 50), "gap_p99_ms": pct(gaps, 99), "gap_max_ms": pct(gaps, 100),
        "total_p50_ms": pct(totals, 50), "total_p99_ms": pct(totals, 99), "total_max_ms": pct(totals, 100),
        "open_at_once": most_at_once(intervals),
        "connect_s": round(connect_seconds, 3),
        "wall_s": round(wall, 3),
        "client_cpu_pct": round(100 * cpu / wall, 1) if wall else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT or https://localhost:PORT")
    parser.add_argument("--cafile", help="CA to verify the server's certificate with (https)")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--extension", action="store_true",
                        help="stream as the DCE extension does, on /k/KEY/api/dce/proxy (--path unused)")
    parser.add_argument("--key", default="")
    parser.add_argument("--model", default="local-model")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--streams-per-connection", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--stagger-ms", type=float, default=0.0,
                        help="connection i sends its first request i x this late (0: all at once)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    summary = asyncio.run(run(args))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
