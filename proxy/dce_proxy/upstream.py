"""The one place that talks to vLLM: pooled HTTP, model discovery, and upstream failures as ApiErrors."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

import urllib3
from flask import Flask, current_app

from .answer import Answer, UpstreamStreamError
from .config import Settings
from .errors import ApiError, upstream_garbage, upstream_unavailable
from .model_status import not_ready_reason
from .sent_request import SentRequest
from .sockets import readable_now

log = logging.getLogger("dce_proxy")

# vLLM can be swapped for another model without a proxy restart; re-read its model list this often.
_MODELS_TTL_SECONDS = 30
# A readiness probe, or a refresh that can fall back on the list already known, waits no longer.
_MODELS_QUICK_TIMEOUT_SECONDS = 3
# TCP keep-alive probes on every connection to vLLM: a vLLM that vanished without closing its
# connections (host gone, network cut) is noticed within about 20 s. Without them a stream would wait
# out DCE_FIRST_BYTE_TIMEOUT while its heartbeats keep the client waiting. A vLLM that is only
# silent (a long prefill, a paused container) still answers the probes from its kernel.
_KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5),
              (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]


# What may go in a request's head (RFC 9110): a method or header name, a target, a header's value.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(r"[\x21-\x7e]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# The headers the proxy writes itself.
_OWN_HEADERS = {"host", "accept-encoding", "user-agent", "authorization", "content-type", "content-length",
                "transfer-encoding", "connection"}


@dataclass(frozen=True)
class ModelInfo:
    served: tuple[str, ...]
    max_model_len: dict[str, int]

    @property
    def default(self) -> str:
        return self.served[0]


class _IdleCheck:
    """urllib3 asks a pooled connection this before reusing it: readable while idle means closed by
    vLLM (its server drops connections idle for 5 s). urllib3's own check is gevent's emulated poll."""

    sock: socket.socket | None

    @property
    def is_connected(self) -> bool:
        return self.sock is not None and not readable_now(self.sock)


class _Connection(_IdleCheck, urllib3.connection.HTTPConnection):
    pass


class _TLSConnection(_IdleCheck, urllib3.connection.HTTPSConnection):
    pass


class _Reading:
    """One read of the model list, awaited by every request that needs it meanwhile."""

    def __init__(self):
        self.done = threading.Event()
        self.models: ModelInfo | None = None
        self.error: ApiError | None = None


class Upstream:
    def __init__(self, settings: Settings):
        url = urllib3.util.parse_url(settings.vllm_url)
        self._prefix = (url.path or "").rstrip("/")
        default_port = 443 if url.scheme == "https" else 80
        self._host = url.host if url.port in (None, default_port) else f"{url.host}:{url.port}"
        self._timeout = urllib3.Timeout(connect=settings.connect_timeout, read=settings.first_byte_timeout)
        # vLLM sends a non-streamed answer only once it is complete: the wait is for all of it.
        self.whole_answer_timeout = urllib3.Timeout(connect=settings.connect_timeout, read=settings.answer_timeout)
        # urllib3 itself, not requests: one pool to one host needs none of requests' per-call
        # session merging, which cost a third of the proxy's CPU per request (py-spy, make bench).
        # No retries: a POST may already be generating. Not blocking: every stream gets a connection.
        # vLLM answers its /v1 routes only to the proxy's key (compose.yaml), sent with every request.
        self._headers = f"Authorization: Bearer {settings.vllm_api_key}\r\n" if settings.vllm_api_key else ""
        self._pool = urllib3.connection_from_url(
            settings.vllm_url, maxsize=2048, block=False, retries=False, timeout=self._timeout,
            socket_options=urllib3.connection.HTTPConnection.default_socket_options + _KEEPALIVE)
        self._pool.ConnectionCls = _TLSConnection if isinstance(self._pool, urllib3.HTTPSConnectionPool) \
            else _Connection
        self._model_status_file = settings.model_status_file
        self._models: ModelInfo | None = None
        self._models_read_at = 0.0
        self._reading: _Reading | None = None  # the model-list read under way, shared by all who ask
        self._reading_lock = threading.Lock()

    # -- model discovery -------------------------------------------------------------------

    def models(self, *, fresh: bool = False) -> ModelInfo:
        """vLLM's served models: the known list, re-read in the background every
        _MODELS_TTL_SECONDS; read now (and waited for) when none is known or when `fresh`.

        No request waits on a refresh while a list is known: a busy or silent engine can be slow to
        list its models, and a readiness probe must not hold up generations. However many ask at
        once, one read is under way at a time, and the others share its answer.
        """
        known = self._models
        if known is None or fresh:
            return self._read_models(quick=fresh or known is not None)
        if time.monotonic() - self._models_read_at > _MODELS_TTL_SECONDS and self._reading is None:
            threading.Thread(target=self._refresh_models, name="dce-models", daemon=True).start()
        return known

    def learn_models(self) -> None:
        """Reads the model list now if vLLM answers quickly; a request reads it later otherwise."""
        try:
            self._read_models(quick=True)
        except ApiError as error:
            log.warning("vLLM's model list is not known yet: %s", error.message)

    def forget_models(self) -> None:
        """vLLM answered 404 for a model: its list may have changed. The next request reads it again
        in the background (the known list serves meanwhile, so no stream waits on the read)."""
        self._models_read_at = float("-inf")

    def _refresh_models(self) -> None:
        try:
            self._read_models(quick=True)
        except ApiError:
            pass  # the known list stays; the next try waits a full TTL rather than hammering vLLM

    def _read_models(self, *, quick: bool) -> ModelInfo:
        with self._reading_lock:  # held for bookkeeping only, never across the read
            reading = self._reading
            leader = reading is None
            if leader:
                reading = self._reading = _Reading()
        if leader:
            try:
                reading.models = self._models = self._fetch_models(quick=quick)
            except ApiError as error:
                reading.error = error
            except Exception:  # a fault of ours: those waiting get a 503, this caller the trace
                reading.error = upstream_unavailable("Reading vLLM's model list failed.")
                raise
            finally:
                self._models_read_at = time.monotonic()
                self._reading = None
                reading.done.set()
        else:
            reading.done.wait()
        if reading.error is not None:
            raise reading.error
        return reading.models

    def _fetch_models(self, *, quick: bool) -> ModelInfo:
        timeout = urllib3.Timeout(connect=self._timeout.connect_timeout, read=_MODELS_QUICK_TIMEOUT_SECONDS) \
            if quick else None
        body = read_all(self.request("GET", "/v1/models", timeout=timeout))
        try:
            cards = json.loads(body)["data"]
            served = tuple(str(card["id"]) for card in cards)
            lengths = {str(card["id"]): int(card["max_model_len"]) for card in cards if card.get("max_model_len")}
        except (ValueError, KeyError, TypeError):
            raise upstream_garbage("vLLM's /v1/models answer is not the expected model list.") from None
        if not served:
            raise upstream_unavailable("vLLM serves no model yet.")
        return ModelInfo(served=served, max_model_len=lengths)

    # -- requests --------------------------------------------------------------------------

    def request(self, method: str, path: str, *, body: bytes | None = None, timeout: urllib3.Timeout | None = None,
                headers: Mapping[str, str] | None = None) -> Answer:
        """Sends one request and reads its answer's head; the caller reads its body (read_all,
        iter_body). Connection failures and 5xx-while-loading become ApiErrors; vLLM's own 4xx
        answers are returned as they are, for the caller to pass through."""
        sent = self.send(method, path, body=body, timeout=timeout, headers=headers)
        answer = sent.answer()
        while answer is None:  # sent once more, on a new connection
            answer = sent.answer()
        return answer

    def send(self, method: str, path: str, *, body: bytes | None = None, timeout: urllib3.Timeout | None = None,
             headers: Mapping[str, str] | None = None) -> SentRequest:
        """Sends one request (with `headers` besides the proxy's own), its answer read later
        (sent_request.py). Raises ApiError when vLLM cannot be reached."""
        return SentRequest(self._pool, self._request_bytes(method, path, body, headers or {}),
                           timeout or self._timeout, self._not_there)

    def _request_bytes(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]) -> bytes:
        """The whole request, to go out in one write. Its answer uncompressed: the relay reads its events.
        Raises ValueError for what would break the request's framing (the callers' own values)."""
        target = self._prefix + path
        if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
            raise ValueError(f"not a request line: {method} {target}")
        head = [f"{method} {target} HTTP/1.1\r\nHost: {self._host}\r\nAccept-Encoding: identity\r\n"
                f"User-Agent: dce-proxy\r\n{self._headers}"]
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name) or name.lower() in _OWN_HEADERS or not _FIELD_VALUE.fullmatch(value):
                raise ValueError(f"not a header the proxy may add: {name}")
            head.append(f"{name}: {value}\r\n")
        if body is not None:
            head.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        elif method in ("POST", "PUT", "PATCH"):
            head.append("Content-Length: 0\r\n")
        head.append("\r\n")
        return "".join(head).encode("latin-1") + (body or b"")

    def _not_there(self, otherwise: str) -> ApiError:
        """The 503 for a vLLM that did not answer: what the model download says, if it says anything."""
        return upstream_unavailable(not_ready_reason(self._model_status_file) or otherwise)


def read_all(answer: Answer) -> bytes:
    """The whole body of an answer; the connection goes back to the pool unless it broke. Raises
    ApiError."""
    pieces = []
    try:
        while not answer.done:
            pieces.append(answer.read(answer.silence_limit) or b"")
    except UpstreamStreamError as error:
        if error.error.status == 503:
            raise upstream_unavailable("vLLM closed the connection before answering.") from None
        raise error.error from None
    return b"".join(pieces)


def iter_body(answer: Answer) -> Iterator[bytes]:
    """Yields a whole answer's body as it arrives; a cut raises UpstreamStreamError."""
    while not answer.done:
        piece = answer.read(answer.silence_limit)
        if piece:
            yield piece


def init_upstream(app: Flask, loaded: Settings) -> None:
    app.extensions["dce_upstream"] = Upstream(loaded)


def upstream() -> Upstream:
    """This app's client of vLLM (one connection pool per worker)."""
    return current_app.extensions["dce_upstream"]
