"""A FAKE vLLM OpenAI-compatible server for the unit tests (this is not vLLM).

It is a real HTTP/1.1 server on 127.0.0.1 (random port, background threads), so
the proxy talks to it over a socket exactly as it talks to vLLM. It mimics what
vLLM 0.32 answers (see shared notes "measured-here.md"): `/health`,
`/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/responses`
(fake_responses.py), `/tokenize`, non-stream and SSE
stream (chunked transfer encoding, `data: {...}\\n\\n` events, `data: [DONE]`),
every choice chunk with an explicit `finish_reason` (null until its last one,
which carries the last token's text, as vLLM 0.32 does; no empty finish chunk),
choice indexes interleaved 0,1,2,0,1,2 when n > 1, and vLLM's exact error
bodies for max_tokens > max_model_len (400) and an unknown model (404).

Controls (plain attributes, reset between tests by `reset()`):
  model_ids        served model ids; the first is the default
  max_model_len    reported by /v1/models, enforced like vLLM
  n_chunks         content chunks per choice (capped by max_tokens)
  chunk_interval   seconds between two stream events
  header_delay     seconds to wait before sending the status line
  models_delay     the same, for /v1/models (a busy engine lists its models slowly)
  reasoning        emit `n_reasoning_chunks` reasoning deltas before content
  reasoning_field  "reasoning" (vLLM 0.32) or "reasoning_content" (older)
  word             text of the content chunks (choice i, chunk j -> f"{word}{i}.{j} ")
  fault            None | "garbage" (non-JSON body / non-JSON SSE event)
                   | "truncate" (connection cut mid-body / mid-stream)
                   | "error" (stream: vLLM's error event, then [DONE])
                   | "stall" (stop sending for `stall_seconds` mid-stream, then
                   until `hold_stream` is set)
  hold_headers     None or a threading.Event: send nothing, not even the status
                   line, until the test sets it (a silence of any length, ended
                   by the test once it saw what it waits for)
  hold_stream      the same, mid-stream, for fault "stall"
  fault_after      content rounds sent before the fault kicks in
  force_error      (status, json_body) answered to every generation request
  reverse_choices  non-stream: list choices in reverse index order
  hang_up_requests the next this many generation requests are dropped without
                   any answer, as a server closing an idle keep-alive connection
                   just as a request arrives on it

Observability:
  requests         every request received (RecordedRequest, with the response
                   bytes the fake wrote in `.response_body`)
  disconnects / disconnected   count / Event: a streaming response saw its
                   peer close (socket readable with EOF, or a write failed)
  open_streams     streams currently being written
  streams_finished streams written to the end

One file of about 500 lines on purpose: every control, fault and observation above acts on one
HTTP handler. The shapes of its answers are tests/vllm_shapes.py's (the benchmark's fake speaks
them too) and fake_responses.py's.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fake_responses import response_events, response_object
from vllm_shapes import (CREATED, DONE, answer_head, dumps as _dumps, models_body, stream_choice, usage as usage_of,
                         whole_choice)

# What vLLM streams when the engine fails mid-generation (an error event, then [DONE]).
ENGINE_ERROR = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError",
                          "param": None, "code": 500}}

DEFAULTS: dict[str, Any] = {
    "model_ids": ("tiny",),
    "max_model_len": 4096,
    "n_chunks": 3,
    "chunk_interval": 0.0,
    "header_delay": 0.0,
    "models_delay": 0.0,
    "reasoning": False,
    "reasoning_field": "reasoning",
    "n_reasoning_chunks": 2,
    "word": "tok",
    "fault": None,
    "fault_after": 1,
    "stall_seconds": 0.0,
    "hold_headers": None,
    "hold_stream": None,
    "force_error": None,
    "reverse_choices": False,
    "hang_up_requests": 0,
}


class _Disconnected(Exception):
    """The peer (the proxy) closed the connection while we were streaming."""


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    response_status: int | None = None
    response_body: bytearray = field(default_factory=bytearray)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # noqa: D401 - quiet
        # A proxy that hangs up is normal here; do not spray tracebacks.
        pass


class FakeVLLM:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self.reset()
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-vllm", daemon=True)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "FakeVLLM":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Back to defaults. Requests still running from an earlier test keep
        their own snapshot and no longer touch the counters (generation id)."""
        with self._lock:
            self._generation += 1
            for name, value in DEFAULTS.items():
                setattr(self, name, value)
            self.requests: list[RecordedRequest] = []
            self.disconnects = 0
            self.disconnected = threading.Event()
            self.open_streams = 0
            self.streams_started = 0
            self.streams_finished = 0

    # -- helpers for tests -------------------------------------------------
    def expected_text(self, index: int, chunks: int | None = None) -> str:
        """The full content the fake generates for choice `index`."""
        k = self.n_chunks if chunks is None else chunks
        return "".join(self._content(index, j) for j in range(k))

    def expected_reasoning(self, index: int) -> str:
        return "".join(self._thought(index, j) for j in range(self.n_reasoning_chunks))

    def _content(self, i: int, j: int) -> str:
        return f"{self.word}{i}.{j} "

    @staticmethod
    def _thought(i: int, j: int) -> str:
        return f"think{i}.{j} "

    @property
    def generation_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith(("completions", "/v1/responses"))]

    @property
    def last_body(self) -> Any:
        """JSON body of the last generation request the fake received."""
        reqs = self.generation_requests
        assert reqs, "the fake vLLM received no generation request"
        return reqs[-1].json

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    # -- internal, called by the handler -----------------------------------
    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap = {name: getattr(self, name) for name in DEFAULTS}
            snap["generation"] = self._generation
            return snap

    def _count(self, generation: int, **deltas: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a leftover from an earlier test
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            if deltas.get("disconnects"):
                self.disconnected.set()

    def _take_hang_up(self, generation: int) -> bool:
        with self._lock:
            if generation != self._generation or self.hang_up_requests <= 0:
                return False
            self.hang_up_requests -= 1
            return True

    def _record(self, generation: int, rec: RecordedRequest) -> None:
        with self._lock:
            if generation == self._generation:
                self.requests.append(rec)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeVLLM

    def setup(self):
        super().setup()
        # Like uvicorn: no Nagle, else headers and body written separately
        # meet the peer's delayed ACK and every answer takes 40 ms more.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    # -- plumbing ----------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _begin(self) -> tuple[RecordedRequest, dict[str, Any]]:
        cfg = self.fake._snapshot()
        body = self._read_body() if self.command == "POST" else b""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        rec = RecordedRequest(self.command, self.path.split("?")[0], dict(self.headers), body, parsed)
        self.fake._record(cfg["generation"], rec)
        return rec, cfg

    def _write(self, rec: RecordedRequest | None, data: bytes) -> None:
        if rec is not None:
            # Recorded before sending: the client may read it before this thread runs again.
            rec.response_body += data
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:  # BrokenPipe, ConnectionReset, ...
            raise _Disconnected() from exc

    def _send_json(self, rec: RecordedRequest, status: int, obj: Any, raw: bytes | None = None,
                   content_type: str = "application/json") -> None:
        payload = _dumps(obj) if raw is None else raw
        rec.response_status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self._write(rec, payload)

    def _vllm_error(self, rec, status: int, message: str, type_: str, param: str | None = None) -> None:
        self._send_json(rec, status, {"error": {"message": message, "type": type_, "param": param, "code": status}})

    def _pause(self, seconds: float) -> None:
        """Wait `seconds`, noticing at once if the peer closes the socket."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([self.connection], [], [], remaining)
            if not readable:
                return
            try:
                peek = self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                peek = b""
            if not peek:
                raise _Disconnected()
            # Unexpected bytes from the client: just wait out the delay.
            time.sleep(max(deadline - time.monotonic(), 0.0))
            return

    def _hold(self, gate: threading.Event | None) -> None:
        """Stay silent until the test sets `gate`, noticing at once if the peer closes the socket."""
        while gate is not None and not gate.is_set():
            self._pause(0.02)

    # -- routes --------------------------------------------------------------
    def do_GET(self):  # noqa: N802 - stdlib name
        rec, cfg = self._begin()
        if rec.path == "/health":
            return self._send_json(rec, 200, None, raw=b"")
        if rec.path == "/v1/models":
            try:
                self._pause(cfg["models_delay"])
            except _Disconnected:
                self.close_connection = True
                return None
            return self._send_json(rec, 200, models_body(cfg["model_ids"], cfg["max_model_len"]))
        return self._send_json(rec, 404, {"detail": "Not Found"})

    def do_POST(self):  # noqa: N802 - stdlib name
        rec, cfg = self._begin()
        if self.fake._take_hang_up(cfg["generation"]):
            return self._hang_up()
        if rec.path == "/v1/chat/completions":
            return self._generate(rec, cfg, chat=True)
        if rec.path == "/v1/completions":
            return self._generate(rec, cfg, chat=False)
        if rec.path == "/v1/responses":
            return self._respond(rec, cfg)
        if rec.path == "/tokenize" and isinstance(rec.json, dict):
            return self._send_json(rec, 200, {"count": 3, "max_model_len": cfg["max_model_len"], "tokens": [1, 2, 3],
                                              "token_strs": None})
        if rec.path == "/detokenize" and isinstance(rec.json, dict):
            return self._send_json(rec, 200, {"prompt": "tok"})
        return self._send_json(rec, 404, {"detail": "Not Found"})

    def _respond(self, rec: RecordedRequest, cfg: dict[str, Any]) -> None:
        """/v1/responses: no checks but the model's; `n_chunks` text deltas."""
        body = rec.json if isinstance(rec.json, dict) else {}
        model = body.get("model")
        if model not in cfg["model_ids"]:
            return self._vllm_error(rec, 404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        pieces = [self.fake._content(0, j) for j in range(cfg["n_chunks"])]
        try:
            self._hold(cfg["hold_headers"])
            if body.get("stream") is True:
                return self._stream(rec, cfg, response_events(model, pieces, CREATED))
            return self._send_json(rec, 200, response_object(model, "".join(pieces), len(pieces), "completed", CREATED))
        except _Disconnected:
            self.close_connection = True
            self.fake._count(cfg["generation"], disconnects=1)

    def _generate(self, rec: RecordedRequest, cfg: dict[str, Any], chat: bool) -> None:
        gen = cfg["generation"]
        try:
            if cfg["header_delay"]:
                self._pause(cfg["header_delay"])
            self._hold(cfg["hold_headers"])
            self._generate_inner(rec, cfg, chat)
        except _Disconnected:
            self.close_connection = True
            self.fake._count(gen, disconnects=1)

    def _generate_inner(self, rec: RecordedRequest, cfg: dict[str, Any], chat: bool) -> None:
        if cfg["force_error"] is not None:
            status, obj = cfg["force_error"]
            return self._send_json(rec, status, obj)
        body = rec.json
        if not isinstance(body, dict):
            return self._vllm_error(rec, 400, "Invalid JSON body", "BadRequestError")
        model = body.get("model") or cfg["model_ids"][0]
        if not isinstance(model, str) or model not in cfg["model_ids"]:
            return self._vllm_error(
                rec, 404, f"The model `{model}` does not exist. Valid aliases: {', '.join(cfg['model_ids'])}.",
                "NotFoundError", "model")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(key)
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            return self._vllm_error(rec, 400, f"{key} must be at least 1, got {max_tokens!r}.", "BadRequestError", key)
        if max_tokens is not None and max_tokens > cfg["max_model_len"]:
            mml = cfg["max_model_len"]
            return self._vllm_error(
                rec, 400,
                f"max_tokens={max_tokens} cannot be greater than max_model_len={mml}. "
                f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
                "BadRequestError", "max_tokens")
        n = body.get("n", 1)
        if n is None:
            n = 1
        if type(n) is not int or n < 1:
            return self._vllm_error(rec, 400, f"n must be at least 1, got {n!r}.", "BadRequestError", "n")
        if chat and not isinstance(body.get("messages"), list):
            return self._vllm_error(rec, 400, "Field required: messages", "BadRequestError", "messages")
        if not chat and not isinstance(body.get("prompt"), (str, list)):
            return self._vllm_error(rec, 400, "Field required: prompt", "BadRequestError", "prompt")

        k = cfg["n_chunks"] if max_tokens is None else min(cfg["n_chunks"], max_tokens)
        finish = "length" if max_tokens is not None and max_tokens <= cfg["n_chunks"] else "stop"
        usage = usage_of(7, n * k, prompt_tokens_details=None)
        if body.get("stream") is True:
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            if options.get("include_usage") and options.get("continuous_usage_stats"):
                usage["continuous"] = True  # (read by _events, never sent)
            return self._stream(rec, cfg, self._events(cfg, chat, model, n, k, finish,
                                                       usage if options.get("include_usage") else None))
        return self._complete(rec, cfg, chat, model, n, k, finish, usage)

    # -- non-stream -----------------------------------------------------------
    def _complete(self, rec, cfg, chat, model, n, k, finish, usage) -> None:
        fake = self.fake
        if cfg["fault"] == "garbage":
            return self._send_json(rec, 200, None, raw=b"<html><body>502 Bad Gateway (garbage)</body></html>")
        choices = []
        for i in range(n):
            text = "".join(f"{cfg['word']}{i}.{j} " for j in range(k))
            thought = {cfg["reasoning_field"]: "".join(fake._thought(i, j) for j in range(cfg["n_reasoning_chunks"]))}
            choices.append(whole_choice(chat, i, text, finish, **(thought if chat and cfg["reasoning"] else {})))
        if cfg["reverse_choices"]:
            choices.reverse()
        obj = {**answer_head(chat, model, streamed=False), "choices": choices, "usage": usage}
        if cfg["fault"] == "truncate":
            # Promise the whole body, send half of it, hang up.
            payload = _dumps(obj)
            rec.response_status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self._write(rec, payload[: len(payload) // 2])
            self._hang_up()
            return
        self._send_json(rec, 200, obj)

    # -- stream ---------------------------------------------------------------
    def _events(self, cfg, chat, model, n, k, finish, usage):
        """Yield (content_round, event bytes) in vLLM's order."""
        fake = self.fake
        base = answer_head(chat, model, streamed=True)

        continuous = usage is not None and usage.pop("continuous", False)
        sent = dict.fromkeys(range(n), 0)  # tokens sent per choice

        def event(choices: list, **extra) -> bytes:
            if continuous and choices:
                # Like vLLM 0.32 with continuous_usage_stats: the choice's own count, this token included.
                index, part = choices[0]["index"], choices[0].get("delta", choices[0].get("text"))
                sent[index] += 1 if part and (isinstance(part, str) or any(
                    part.get(name) for name in ("content", "reasoning", "reasoning_content"))) else 0
                extra["usage"] = {"prompt_tokens": 7, "total_tokens": 7 + sent[index],
                                  "completion_tokens": sent[index], "completion_tokens_details": {"reasoning_tokens": 0}}
            return b"data: " + _dumps({**base, "choices": choices, **extra}) + b"\n\n"

        def choice(i: int, delta_or_text, finish_reason=None) -> dict:
            return stream_choice(chat, i, delta_or_text, finish_reason)

        if chat:
            for i in range(n):
                yield -1, event([choice(i, {"role": "assistant", "content": ""})])
            if cfg["reasoning"]:
                for j in range(cfg["n_reasoning_chunks"]):
                    for i in range(n):
                        yield -1, event([choice(i, {cfg["reasoning_field"]: fake._thought(i, j)})])
        # Like vLLM 0.32: the last token's text travels in the chunk that carries finish_reason.
        for j in range(max(k, 1)):
            last = j == max(k, 1) - 1
            for i in range(n):
                text = f"{cfg['word']}{i}.{j} " if j < k else ""
                yield j, event([choice(i, {"content": text} if chat else text, finish if last else None)])
        if usage is not None:
            yield k, event([], usage=usage)
        yield k, DONE

    def _stream(self, rec, cfg, events) -> None:
        """Writes `events` ((content round, bytes) pairs), with the configured interval and fault."""
        gen = cfg["generation"]
        rec.response_status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.fake._count(gen, open_streams=1, streams_started=1)
        try:
            first = True
            faulted = False
            for content_round, data in events:
                if not first:
                    self._pause(cfg["chunk_interval"])
                else:
                    self._pause(0)  # notice an early hang-up too
                first = False
                if cfg["fault"] and not faulted and content_round >= cfg["fault_after"]:
                    faulted = True
                    if cfg["fault"] == "truncate":
                        self._hang_up()
                        return
                    if cfg["fault"] == "stall":
                        self._pause(cfg["stall_seconds"])
                        self._hold(cfg["hold_stream"])
                    if cfg["fault"] == "garbage":
                        self._chunk(rec, b"data: {this is not json at all\n\n")
                    if cfg["fault"] == "error":
                        self._chunk(rec, b"data: " + _dumps(ENGINE_ERROR) + b"\n\ndata: [DONE]\n\n")
                        break
                self._chunk(rec, data)
            self._write(None, b"0\r\n\r\n")  # end of chunked body: framing, not body bytes
            self.fake._count(gen, streams_finished=1)
        finally:
            self.fake._count(gen, open_streams=-1)

    def _chunk(self, rec: RecordedRequest, data: bytes) -> None:
        # One HTTP chunk per SSE event, like uvicorn does for vLLM.
        rec.response_body += data
        try:
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            self.wfile.flush()
        except OSError as exc:
            raise _Disconnected() from exc

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

