"""The Responses API's event stream (/v1/responses), relayed byte for byte.

It differs from a chat stream in three ways this module knows: each event is typed (`event:` line),
the stream ends with response.completed, response.incomplete or response.failed instead of
[DONE], and its usage is in that last event's `response`. An error the proxy adds is an `error`
event, in the Responses shape plus the OpenAI error object, on which the OpenAI SDKs raise.
"""

from __future__ import annotations

import json
import re

from .errors import ApiError, upstream_unavailable
from .record import RequestRecord
from .sse import EventSplitter, LineMatch, event_data, event_json, split_whole

# The event that ends a response, as its `event:` line (JSON holds no raw line break: text cannot
# start a line).
_LAST_EVENT = LineMatch(rb"(?:^|\n)event: ?response\.(?:completed|incomplete|failed)\r?\n",
                        b"response.completed", b"response.incomplete", b"response.failed")
_FAILURE_EVENT = LineMatch(rb"(?:^|\n)event: ?(?:error|response\.failed)\r?\n", b"error", b"response.failed")
# A delta of output text, reasoning text or tool-call arguments: one token each.
_TEXT_DELTA = re.compile(rb'"delta":\s*"[^"]')
_EARLY_END = "vLLM ended the response stream before it was complete."


def response_error_event(error: ApiError) -> bytes:
    body = error.body()
    event = {"type": "error", "code": error.code, "message": error.message, "param": error.param, **body}
    return b"event: error\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


class ResponseEventsRelay:
    """vLLM's Responses events go out as it sent them, each as soon as it is complete."""

    stopped = False  # it never ends a stream on its own
    at_boundary = True  # it only ever sends whole events

    def __init__(self, record: RequestRecord):
        self.complete = False  # the response's last event went out
        self.failed = False  # the stream carried an error or response.failed
        self._record = record
        self._splitter = EventSplitter()

    @staticmethod
    def ending(error: ApiError) -> bytes:
        return response_error_event(error)

    def feed(self, chunk: bytes) -> bytes:
        events = self._splitter.whole(chunk)
        return self._relayed(events) if events else b""

    def end(self) -> bytes:
        rest = b"".join(event + b"\n\n" for event in self._splitter.rest() if event_json(event_data(event) or b""))
        out = self._relayed(rest) if rest else b""
        # A stream that already carried vLLM's error ends with it: the client has its reason.
        return out if self.complete or self.failed else out + response_error_event(upstream_unavailable(_EARLY_END))

    def _relayed(self, events: bytes) -> bytes:
        self._record.saw_text_events(len(_TEXT_DELTA.findall(events)))
        self.failed = self.failed or _FAILURE_EVENT.found_in(events)
        if _LAST_EVENT.found_in(events):
            self.complete = True
            self._take_usage(events)
        return events

    def _take_usage(self, events: bytes) -> None:
        for event in split_whole(events):
            if _LAST_EVENT.found_in(event):
                payload = event_json(event_data(event) or b"") or {}
                response = payload.get("response")
                usage = response.get("usage") if isinstance(response, dict) else None
                if isinstance(usage, dict):
                    self._record.take_usage({"prompt_tokens": usage.get("input_tokens"),
                                             "completion_tokens": usage.get("output_tokens")}, final=True)
