"""Turning vLLM's answer into the client's: JSON bodies, raw SSE pass-through, or SSE rewritten per event."""

from __future__ import annotations

import json
from typing import Callable, Iterator

import urllib3
from flask import Response, current_app, request

from .errors import ApiError, from_upstream, upstream_garbage, upstream_unavailable
from .limits import GENERATION_ENDED
from .payload import fit_to_model
from .sse import DONE, data_event, event_data, split_events
from .upstream import UpstreamStreamError, iter_body, read_all

# Per-event rewrite: takes the decoded event, returns the bytes to send (b"" to send nothing).
EventRewriter = Callable[[dict], bytes]
# Builds the event that tells the client its stream failed.
ErrorEvent = Callable[[ApiError], bytes]

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def stats() -> dict:
    """Token counts of this request, for the access log (filled in as the answer goes out)."""
    return request.environ.setdefault("dce.stats", {})


def upstream_error_response(upstream: urllib3.BaseHTTPResponse) -> Response:
    """vLLM's own error, passed through with its status when it is the JSON error we expect."""
    try:
        body = read_all(upstream)
    except ApiError:
        body = b""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return Response(body, status=upstream.status, mimetype="application/json")
    except ValueError:
        pass
    raise upstream_garbage(f"vLLM answered HTTP {upstream.status} without a JSON error.")


def read_json(upstream: urllib3.BaseHTTPResponse) -> tuple[bytes, dict]:
    """vLLM's JSON answer: its bytes (to pass on untouched) and their parsed form."""
    body = read_all(upstream)
    try:
        parsed = json.loads(body)
    except ValueError:
        raise upstream_garbage("vLLM's answer is not valid JSON.") from None
    if not isinstance(parsed, dict):
        raise upstream_garbage("vLLM's answer is not a JSON object.")
    usage = parsed.get("usage")
    if isinstance(usage, dict):
        stats().update(prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))
    return body, parsed


def json_body_response(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _require_event_stream(upstream: urllib3.BaseHTTPResponse) -> None:
    if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        upstream.close()
        raise upstream_garbage("vLLM answered a streaming request without an event stream.")


def _stream_response(upstream: urllib3.BaseHTTPResponse, body: Iterator[bytes]) -> Response:
    ended = request.environ.get(GENERATION_ENDED) or (lambda: None)  # read now: the body runs after the view
    response = Response(_freeing_slot_at_done(body, ended), mimetype="text/event-stream", headers=_STREAM_HEADERS)
    # Closing the upstream socket is what makes vLLM abort the generation and free the GPU.
    response.call_on_close(upstream.close)
    return response


def _freeing_slot_at_done(body: Iterator[bytes], ended: Callable[[], None]) -> Iterator[bytes]:
    """Frees the request's generation slot (limits.holds_generation_slot) as the final DONE goes
    out, before the client has it: a client that starts its next generation at once finds it free."""
    tail = b""
    for piece in body:
        tail = (tail + piece)[-len(DONE) - 4:]
        if DONE.strip() in tail:
            ended()
        yield piece


def passthrough_stream(upstream: urllib3.BaseHTTPResponse, error_event: ErrorEvent) -> Response:
    """Bytes go out exactly as vLLM sent them, each chunk as soon as it arrives."""
    _require_event_stream(upstream)

    def body() -> Iterator[bytes]:
        tail = b""
        try:
            for chunk in iter_body(upstream):
                tail = (tail + chunk)[-len(DONE) - 4:]
                yield chunk
        except UpstreamStreamError as exc:
            yield error_event(exc.error) + DONE
            return
        if DONE.strip() not in tail:
            yield error_event(upstream_unavailable("vLLM ended the stream before it was complete.")) + DONE

    return _stream_response(upstream, body())


def rewritten_stream(upstream: urllib3.BaseHTTPResponse, rewrite: EventRewriter, error_event: ErrorEvent) -> Response:
    """Each upstream event is decoded, rewritten and sent on its own, as soon as it is complete."""
    _require_event_stream(upstream)

    def body() -> Iterator[bytes]:
        try:
            for event in split_events(iter_body(upstream)):
                data = event_data(event)
                if data is None:
                    continue
                if data.strip() == b"[DONE]":
                    yield DONE
                    return
                try:
                    payload = json.loads(data)
                except ValueError:
                    payload = None
                if not isinstance(payload, dict):
                    yield error_event(upstream_garbage("vLLM sent an event that is not a JSON object.")) + DONE
                    return
                if isinstance(payload.get("error"), dict):
                    yield error_event(from_upstream(payload["error"], 502)) + DONE
                    return
                out = rewrite(payload)
                if out:
                    yield out
        except UpstreamStreamError as exc:
            yield error_event(exc.error) + DONE
            return
        yield error_event(upstream_unavailable("vLLM ended the stream before it was complete.")) + DONE

    return _stream_response(upstream, body())


def forward(path: str, body: dict, *, error_event: ErrorEvent, rewrite_event: EventRewriter | None = None,
            rewrite_json: Callable[[dict], dict] | None = None) -> Response:
    """Sends a checked body to vLLM (model and token budget fitted) and relays the answer."""
    upstream = current_app.extensions["dce_upstream"]
    fit_to_model(body, upstream.models())
    answer = upstream.request("POST", path, body=json.dumps(body).encode(), stream=True)
    if answer.status >= 400:
        if answer.status == 404:
            upstream.forget_models()  # the served model may have changed under us
        return upstream_error_response(answer)
    if body.get("stream"):
        if rewrite_event is None:
            return passthrough_stream(answer, error_event)
        return rewritten_stream(answer, rewrite_event, error_event)
    body_bytes, parsed = read_json(answer)
    if rewrite_json is None:
        return Response(body_bytes, mimetype="application/json")
    return json_body_response(rewrite_json(parsed))
