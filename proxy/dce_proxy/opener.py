"""Opens a streamed answer of vLLM's: sends the request at once, then tells how vLLM answered when
asked, waiting for it no longer than the caller says, so that the response can send heartbeats while
vLLM is still to answer (a long prefill, a full engine): Opened (a 200 event stream, whose body the
response then reads: answer.py), Refused (vLLM's own error answer) or Failed (an ApiError)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, Union

from .answer import Answer
from .errors import ApiError, upstream_garbage, upstream_unavailable
from .sent_request import SentRequest
from .upstream import Upstream, read_all

log = logging.getLogger("dce_proxy")


@dataclass(frozen=True)
class Opened:
    body: Answer  # a 200 event stream, its body still to read


@dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclass(frozen=True)
class Refused:
    """vLLM answered with an error status; its body is passed on (or turned into an error event)."""
    status: int
    body: bytes


Answered = Union[Opened, Refused, Failed]


class StreamOpener:
    def __init__(self, upstream: Upstream, path: str, body: bytes, headers: Mapping[str, str]):
        self._sent: SentRequest | None = None
        self._outcome: Answered | None = None
        try:
            self._sent = upstream.send("POST", path, body=body, headers=headers)
        except ApiError as error:
            self._outcome = Failed(error)

    def outcome(self, timeout: float) -> Answered | None:
        """How vLLM answered; None if it has not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._outcome is None:
            try:
                if not self._sent.answered_within(deadline - time.monotonic()):
                    return None
                answer = self._sent.answer()
                if answer is not None:  # (None: sent again, on a new connection)
                    self._outcome = self._opened_or_closed(answer)
            except ApiError as error:
                self._outcome = Failed(error)
            except Exception:  # a stream that breaks here must still end with an error its client sees
                log.exception("opening vLLM's stream failed")
                self._sent.close()
                self._outcome = Failed(upstream_unavailable("Opening vLLM's stream failed."))
        return self._outcome

    def close(self) -> None:
        """The response is gone: vLLM's connection closes, which makes vLLM abort the generation."""
        if isinstance(self._outcome, Opened):
            self._outcome.body.close()
        elif self._outcome is None:
            self._sent.close()

    def _opened_or_closed(self, answer: Answer) -> Answered:
        try:
            return self._opened(answer)
        except BaseException:
            answer.close()
            raise

    def _opened(self, answer: Answer) -> Answered:
        if answer.status >= 400:
            try:
                return Refused(answer.status, read_all(answer))
            except ApiError as error:
                return Failed(error)
        problem = _not_an_event_stream(answer)
        if problem is not None:
            answer.close()
            return Failed(upstream_garbage(problem))
        return Opened(answer)


def _not_an_event_stream(answer: Answer) -> str | None:
    if not answer.headers.get("content-type", "").startswith("text/event-stream"):
        return "vLLM answered a streaming request without an event stream."
    if answer.headers.get("content-encoding", "identity") != "identity":
        return "vLLM compressed a stream the proxy did not ask to be compressed."
    return None
