"""OpenAI-compatible pass-through, so any OpenAI SDK (or the extension pointed at /v1) works."""

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


@bp.post("/chat/completions")
@holds_generation_slot
def chat_completions():
    body = json_object()
    check_messages(body)
    return forward("/v1/chat/completions", body, error_event=openai_error_event)


@bp.post("/completions")
@holds_generation_slot
def completions():
    body = json_object()
    check_prompt(body)
    return forward("/v1/completions", body, error_event=openai_error_event)
