"""What one request did, in one typed object: who asked (the key's name), its generation slot, the
tokens it cost and how its stream ended. The views, the relay and the stream fill it in as the
answer goes out; when the response closes, the access log and the metrics report it, once."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable

from flask import Flask, Response, request

from .config import PUBLIC_ENDPOINTS

if TYPE_CHECKING:
    from .limits import Slot

_RECORD = "dce.record"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")



class Outcome(str, Enum):
    """How a stream ended."""
    DONE = "done"  # vLLM's [DONE] went out after its last token
    CLIENT_GONE = "client_gone"  # the client closed it first
    UPSTREAM_ERROR = "upstream_error"  # on an error event: vLLM's error, vLLM gone, the limits store gone
    TIMEOUT = "timeout"  # no slot in time, or vLLM silent past DCE_FIRST_BYTE_TIMEOUT


@dataclass
class RequestRecord:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    key: str | None = None  # the key's name, or "ip:ADDRESS" in open mode; never the key
    slot: Slot | None = None
    # Set as the response leaves the view.
    method: str = ""
    route: str = "unmatched"
    status: int = 0
    stream: bool = False
    # Filled in as the answer goes out.
    prompt_tokens: int | None = None  # vLLM's count
    vllm_completion_tokens: int | None = None  # vLLM's count, sent once the answer is complete
    text_events: int = 0  # events relayed that carried generated text (a token each)
    first_token_at: float | None = None
    outcome: Outcome | None = None  # streams only

    def take_usage(self, usage: dict, *, final: bool) -> None:
        """vLLM's usage: its prompt count from any event, its completion count from the final one
        (an event's own counts only its choice's tokens)."""
        for name in ("prompt_tokens", "completion_tokens") if final else ("prompt_tokens",):
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, "vllm_completion_tokens" if name == "completion_tokens" else name, value)

    def saw_text_events(self, events: int) -> None:
        if events and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text_events += events

    def end_stream(self, outcome: Outcome) -> None:
        """The first way a stream ended is the one it ended by."""
        if self.outcome is None:
            self.outcome = outcome

    @property
    def tokens_exact(self) -> bool:
        return self.vllm_completion_tokens is not None

    @property
    def completion_tokens(self) -> int | None:
        """vLLM's count; for a stream cut before vLLM's count came, the tokens relayed to its client."""
        if self.vllm_completion_tokens is not None:
            return self.vllm_completion_tokens
        return self.text_events if self.stream else None

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def current_record() -> RequestRecord:
    """This request's record (made at its start)."""
    record = request.environ.get(_RECORD)
    if record is None:
        record = request.environ[_RECORD] = RequestRecord(_request_id())
    return record


def _request_id() -> str:
    incoming = request.headers.get("X-Request-Id", "")
    return incoming if _CLIENT_REQUEST_ID.match(incoming) else uuid.uuid4().hex


def init_records(app: Flask, reporters: list[Callable[[RequestRecord], None]]) -> None:
    """Each request gets its record first thing; `reporters` read it when its response has closed
    (a stream's once it ended, so its times and counts cover all of it). Health probes that
    succeed are not reported: Docker's probe every 10 s would drown the real traffic."""

    @app.before_request
    def start_record():
        current_record()

    @app.after_request
    def report_when_closed(response: Response) -> Response:
        record = current_record()
        response.headers["X-Request-Id"] = record.request_id
        if request.endpoint in PUBLIC_ENDPOINTS and response.status_code < 400:
            return response
        record.method = request.method
        record.route = request.url_rule.rule if request.url_rule else "unmatched"
        record.status = response.status_code
        record.stream = response.mimetype == "text/event-stream"

        def report():
            for reporter in reporters:
                reporter(record)

        response.call_on_close(report)
        return response
