"""OpenAI-compatible pass-through, so any OpenAI SDK works (the extension has its own route, dce.py)."""

from flask import Blueprint, Response, current_app

from ..limits import holds_generation_slot
from ..payload import check_messages, check_prompt, json_object
from ..relay import forward, read_json, upstream_error_response
from ..sse import data_event

bp = Blueprint("openai", __name__, url_prefix="/v1")


def openai_error_event(error):
    # OpenAI SDKs raise an APIError for a stream event that carries an "error" object.
    return data_event(error.body())


@bp.get("/models")
def models():
    answer = current_app.extensions["dce_upstream"].request("GET", "/v1/models")
    if answer.status >= 400:
        return upstream_error_response(answer)
    body, _ = read_json(answer)
    return Response(body, mimetype="application/json")


def _checked_forward(path: str, check) -> Response:
    body = json_object()
    check(body)
    return forward(path, body, error_event=openai_error_event)


@bp.post("/chat/completions")
@holds_generation_slot
def chat_completions():
    return _checked_forward("/v1/chat/completions", check_messages)


@bp.post("/completions")
@holds_generation_slot
def completions():
    return _checked_forward("/v1/completions", check_prompt)
