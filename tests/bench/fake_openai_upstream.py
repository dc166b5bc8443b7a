"""A FAKE OpenAI/vLLM upstream for the benchmark only (`make bench`): not vLLM, not used by the tests.

It answers like vLLM 0.32's OpenAI server and is fast enough not to be the bottleneck at
1,000 concurrent streams on 2 cores: raw HTTP/1.1 on asyncio Protocols (uvloop when installed),
no framework, responses precomputed, and every stream driven by loop timers instead of a task.

  GET  /v1/models            one model card with max_model_len (the proxy maps "local-model" to it)
  POST /v1/completions       non-stream JSON, or an SSE stream of text_completion chunks
  POST /v1/chat/completions  non-stream JSON, or an SSE stream of chat.completion.chunk chunks
  GET  /bench/stats          counters as JSON: requests, streams, open streams, peak, models seen
  POST /bench/reset          zeroes the counters (the peak of open streams, mostly)

The request body decides the answer: `max_tokens` is the number of tokens (one SSE event each,
as vLLM sends them, 16 when absent), `stream` picks SSE, and the benchmark-only field
`bench_interval_ms` is the cadence between two events (vLLM ignores unknown fields; this fake
reads this one). A stream sends its first event with the headers, then one event every
interval on a fixed schedule (no drift), then `data: [DONE]`, each as its own HTTP chunk.
A connection idle for 5 s after an answer is closed, as uvicorn (vLLM's server) closes it.

Run: python fake_openai_upstream.py --port 18000 [--model NAME] [--host 127.0.0.1]

One file of about 300 lines on purpose: it runs as a process of its own; the shapes of its answers
are tests/vllm_shapes.py's, which the unit suite's fake speaks too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from email.utils import formatdate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shapes the unit fake speaks too
from vllm_shapes import DONE, answer_head, dumps as _dumps, event, models_body, stream_choice, usage, whole_choice  # noqa: E402

DEFAULT_TOKENS = 16
# As uvicorn, which serves vLLM (its timeout_keep_alive): a connection idle this long after an answer
# is closed, so a burst after a pause finds the proxy's pooled connections closed, as it would.
IDLE_CLOSE_SECONDS = 5.0
MAX_TOKENS = 100_000


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Responses:
    """Every byte the fake sends, built once per (route, model, tokens) and reused."""

    def __init__(self, model: str, max_model_len: int):
        self.model = model
        self.models_body = _dumps(models_body([model], max_model_len))
        self._json: dict[tuple, bytes] = {}
        self._events: dict[tuple, list[bytes]] = {}

    def body(self, chat: bool, model: str, tokens: int) -> bytes:
        key = (chat, model, tokens)
        cached = self._json.get(key)
        if cached is None:
            text = "".join(f" tok{j}" for j in range(tokens))
            reasoning = {"reasoning": None} if chat else {}
            cached = _dumps({**answer_head(chat, model, streamed=False),
                             "choices": [whole_choice(chat, 0, text, "length", **reasoning)],
                             "usage": usage(8, tokens, prompt_tokens_details=None)})
            self._json[key] = cached
        return cached

    def events(self, chat: bool, model: str, tokens: int, with_usage: bool = False,
               continuous: bool = False) -> list[bytes]:
        """The stream's HTTP chunks: one per token (the last one carries finish_reason), vLLM's usage
        chunk with `with_usage` (stream_options.include_usage), then [DONE]. With `continuous`
        (continuous_usage_stats too), vLLM's usage in every chunk as well."""
        key = (chat, model, tokens, with_usage, continuous)
        cached = self._events.get(key)
        if cached is None:
            head = answer_head(chat, model, streamed=True)
            cached = []
            for j in range(tokens):
                finish = "length" if j == tokens - 1 else None
                text = f" tok{j}"
                delta_or_text = ({"role": "assistant", "content": text} if j == 0 else {"content": text}) if chat else text
                counts = {"usage": usage(8, j + 1, completion_tokens_details=None)} if continuous else {}
                cached.append(_chunk(event({**head, "choices": [stream_choice(chat, 0, delta_or_text, finish)], **counts})))
            if with_usage:
                cached.append(_chunk(event({**head, "choices": [], "usage": usage(8, tokens)})))
            cached.append(_chunk(DONE) + b"0\r\n\r\n")
            self._events[key] = cached
        return cached


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.requests = 0
        self.streams = 0
        self.open_streams = getattr(self, "open_streams", 0)
        self.peak_open_streams = self.open_streams
        self.models: dict[str, int] = {}
        self.bad_requests = 0

    def as_json(self) -> bytes:
        return _dumps({"requests": self.requests, "streams": self.streams, "open_streams": self.open_streams,
                       "peak_open_streams": self.peak_open_streams, "models": self.models,
                       "bad_requests": self.bad_requests})


class _Date:
    """The Date header, formatted at most once a second."""

    def __init__(self, loop):
        self.loop = loop
        self.second = -1
        self.value = b""

    def get(self) -> bytes:
        now = int(self.loop.time())
        if now != self.second:
            self.second = now
            self.value = formatdate(usegmt=True).encode()
        return self.value


class Connection(asyncio.Protocol):
    def __init__(self, server: "FakeUpstream"):
        self.server = server
        self.loop = server.loop
        self.transport = None
        self.buffer = b""
        self.streaming = False
        self.closed = False
        self.close_after = False
        self.idle_close = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.idle_close is not None:
            self.idle_close.cancel()
        if self.streaming:
            self.streaming = False
            self.server.stats.open_streams -= 1

    def data_received(self, data: bytes):
        if self.idle_close is not None:
            self.idle_close.cancel()
            self.idle_close = None
        self.buffer += data
        if not self.streaming:
            self._serve_buffered()

    def _serve_buffered(self):
        while not self.streaming and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._respond(400, b'{"error":"bad request line"}', close=True)
                return
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4:total]
            self.buffer = self.buffer[total:]
            self.close_after = close
            self._route(method, target.split("?", 1)[0], body)

    def _respond(self, status: int, body: bytes, *, close: bool = False, content_type=b"application/json"):
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
        close = close or self.close_after
        self.transport.write(b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: uvicorn\r\ncontent-length: %d\r\n"
                             b"content-type: %s\r\n%s\r\n%s" % (
                                 status, reason, self.server.date.get(), len(body), content_type,
                                 b"connection: close\r\n" if close else b"", body))
        if close:
            self.closed = True
            self.transport.close()
        else:
            self._answered()

    def _answered(self):
        if not self.buffer and self.idle_close is None:
            self.idle_close = self.loop.call_later(IDLE_CLOSE_SECONDS, self._close_idle)

    def _close_idle(self):
        self.idle_close = None
        if not self.streaming and not self.closed:
            self.closed = True
            self.transport.close()

    def _route(self, method: str, path: str, body: bytes):
        server = self.server
        stats = server.stats
        if method == "GET" and path == "/v1/models":
            self._respond(200, server.responses.models_body)
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            stats.requests += 1
            try:
                request = json.loads(body)
                tokens = int(request.get("max_tokens") or DEFAULT_TOKENS)
                interval = float(request.get("bench_interval_ms") or 0) / 1000
                model = str(request.get("model") or server.responses.model)
                if not 1 <= tokens <= MAX_TOKENS or interval < 0:
                    raise ValueError
            except (ValueError, TypeError, AttributeError):
                stats.bad_requests += 1
                self._respond(400, b'{"error":{"message":"bad body","type":"BadRequestError","code":400}}')
                return
            stats.models[model] = stats.models.get(model, 0) + 1
            chat = path == "/v1/chat/completions"
            if request.get("stream"):
                options = request.get("stream_options") or {}
                with_usage = bool(options.get("include_usage"))
                self._start_stream(server.responses.events(chat, model, tokens, with_usage,
                                                           with_usage and bool(options.get("continuous_usage_stats"))),
                                   interval)
            else:
                self._respond(200, server.responses.body(chat, model, tokens))
        elif method == "GET" and path == "/bench/stats":
            self._respond(200, stats.as_json())
        elif method == "POST" and path == "/bench/reset":
            stats.reset()
            self._respond(200, b"{}")
        elif method == "GET" and path == "/health":
            self._respond(200, b"")
        else:
            self._respond(404, b'{"detail":"Not Found"}')

    # -- streams: one timer callback per event, scheduled from the start time (no drift) --------

    def _start_stream(self, events: list[bytes], interval: float):
        stats = self.server.stats
        stats.streams += 1
        stats.open_streams += 1
        if stats.open_streams > stats.peak_open_streams:
            stats.peak_open_streams = stats.open_streams
        self.streaming = True
        self.events = events
        self.interval = interval
        self.next_event = 1
        self.started = self.loop.time()
        self.transport.write(b"HTTP/1.1 200 OK\r\ndate: %s\r\nserver: uvicorn\r\n"
                             b"content-type: text/event-stream; charset=utf-8\r\n"
                             b"transfer-encoding: chunked\r\n%s\r\n%s" % (
                                 self.server.date.get(),
                                 b"connection: close\r\n" if self.close_after else b"", events[0]))
        self._schedule()

    def _schedule(self):
        if self.next_event == len(self.events) - 1:
            # [DONE] follows the last token at once, as vLLM sends it.
            self._send_next()
        elif self.interval:
            self.loop.call_at(self.started + self.next_event * self.interval, self._send_next)
        else:
            self.loop.call_soon(self._send_next)

    def _send_next(self):
        if self.closed:
            return
        self.transport.write(self.events[self.next_event])
        self.next_event += 1
        if self.next_event < len(self.events):
            self._schedule()
            return
        self.streaming = False
        self.server.stats.open_streams -= 1
        if self.close_after:
            self.closed = True
            self.transport.close()
        elif self.buffer:
            self._serve_buffered()
        else:
            self._answered()


class FakeUpstream:
    def __init__(self, loop, model: str, max_model_len: int):
        self.loop = loop
        self.responses = Responses(model, max_model_len)
        self.stats = Stats()
        self.date = _Date(loop)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="bench-served-model")
    parser.add_argument("--max-model-len", type=int, default=32768)
    args = parser.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
        flavour = "uvloop"
    except ImportError:
        flavour = "asyncio"
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    upstream = FakeUpstream(loop, args.model, args.max_model_len)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server = loop.run_until_complete(loop.create_server(lambda: Connection(upstream), sock=sock, backlog=8192))
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, loop.stop)
    print(f"fake OpenAI upstream ({flavour}) on http://{args.host}:{args.port}, model {args.model}", file=sys.stderr,
          flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
