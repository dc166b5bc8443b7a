"""OpenAI-compatible routes, so any OpenAI SDK works (the extension has its own route, dce.py):
generations go through the generation limits; the utility routes cost the GPU little or nothing
and count as requests only. Every other route of vLLM's (LoRA loading, cache resets, sleep, ...)
is an operator's, never served here: 404."""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, request

from ..errors import invalid
from ..limits import holds_generation_slot
from ..request_body import check_input, check_messages, check_prompt, generation_body, json_object, map_model
from ..relay import forward, forward_response, read_json, upstream_error_response
from ..sse import data_event
from ..upstream import upstream

bp = Blueprint("openai", __name__, url_prefix="/v1")
# Utility routes at vLLM's own paths (not under /v1), for the clients that know them.
utility_bp = Blueprint("utility", __name__)

# vLLM's response ids: resp_ and hex digits; nothing that could change the path sent on.
_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def openai_error_event(error):
    # OpenAI SDKs raise an APIError for a stream event that carries an "error" object.
    return data_event(error.body())


def _passed_on(method: str, path: str, body: dict | None = None) -> Response:
    """vLLM's JSON answer to a request that generates nothing, passed on as it is."""
    answer = upstream().request(
        method, path, body=None if body is None else json.dumps(body).encode())
    if answer.status >= 400:
        return upstream_error_response(answer)
    raw, _ = read_json(answer)
    return Response(raw, status=answer.status, mimetype="application/json")


@bp.get("/models")
def models():
    return _passed_on("GET", "/v1/models")


@bp.post("/chat/completions")
@holds_generation_slot
def chat_completions():
    return forward("/v1/chat/completions", generation_body(check_messages), error_event=openai_error_event)


@bp.post("/completions")
@holds_generation_slot
def completions():
    return forward("/v1/completions", generation_body(check_prompt), error_event=openai_error_event)


@bp.post("/responses")
@holds_generation_slot
def create_response():
    return forward_response(generation_body(check_input))


def _response_path(response_id: str, action: str = "") -> str:
    if not _RESPONSE_ID.fullmatch(response_id):
        raise invalid("response_id", "A response id holds only letters, digits, '_' and '-'.")
    return f"/v1/responses/{response_id}{action}"


@bp.get("/responses/<response_id>")
def retrieve_response(response_id: str):
    if request.args.get("stream", "false").lower() != "false":
        raise invalid("stream", "Replaying a stored response as a stream is not served; ask without 'stream'.")
    return _passed_on("GET", _response_path(response_id))


@bp.post("/responses/<response_id>/cancel")
def cancel_response(response_id: str):
    return _passed_on("POST", _response_path(response_id, "/cancel"))


@bp.post("/embeddings")
@holds_generation_slot
def embeddings():
    # Served only by vLLM running an embedding model; for a chat model vLLM has no such route (a 404).
    body = json_object()
    map_model(body, upstream().models())
    return _passed_on("POST", "/v1/embeddings", body)


@utility_bp.post("/tokenize")
def tokenize():
    body = json_object()
    if "messages" in body:
        check_messages(body)
    else:
        check_prompt(body)
    map_model(body, upstream().models())
    return _passed_on("POST", "/tokenize", body)


@utility_bp.post("/detokenize")
def detokenize():
    body = json_object()
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(token, int) and not isinstance(token, bool)
                                               for token in tokens):
        raise invalid("tokens", "'tokens' must be a list of token ids.")
    map_model(body, upstream().models())
    return _passed_on("POST", "/detokenize", body)
