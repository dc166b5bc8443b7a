"""The DCE's own routes: what the released extension sends, and the n-answers generate contract."""

from __future__ import annotations

from flask import Blueprint

from ..chunks import choices, error_chunks, for_extension, for_extension_bytes, mirror_reasoning
from ..config import settings
from ..errors import ApiError, upstream_garbage
from ..limits import holds_generation_slot, waits_for_generation_slot
from ..request_body import (boolean, check_messages, fit_to_model, generation_body, integer, json_object, number,
                            stop_sequences, string)
from ..relay import forward
from ..sse import data_event
from ..upstream import upstream

bp = Blueprint("dce", __name__, url_prefix="/api/dce")

_SEED_RANGE = (-(2**63), 2**63 - 1)


# -- /api/dce/proxy: the extension v1.2.0, unchanged ------------------------------------------------

def extension_error_event(error: ApiError) -> bytes:
    return b"".join(data_event(chunk) for chunk in error_chunks(error))


@bp.post("/proxy")
@waits_for_generation_slot
def extension_proxy():
    body = generation_body(check_messages)

    def rewrite_event(payload: dict) -> bytes:
        return b"".join(data_event(chunk) for chunk in for_extension(payload))

    def rewrite_json(payload: dict) -> dict:
        for choice in choices(payload):
            mirror_reasoning(choice.get("message"))
        return payload

    return forward("/v1/chat/completions", body, error_event=extension_error_event,
                   rewrite_event=rewrite_event, rewrite_event_bytes=for_extension_bytes, rewrite_json=rewrite_json)


# -- /api/dce/generate: one prompt, n answers ----------------------------------------------------

def generate_error_event(error: ApiError) -> bytes:
    return data_event({"type": "error", **error.body()})


def _vllm_body(body: dict) -> tuple[str, dict]:
    defaults = settings()
    prompt = string(body, "prompt", required=True)
    chat = boolean(body, "chat")
    vllm_body = {
        "model": string(body, "model"),
        "n": integer(body, "n", low=1, high=defaults.max_n, default=defaults.default_n),
        "max_tokens": integer(body, "max_tokens", low=1, default=defaults.default_max_tokens),
        "temperature": number(body, "temperature", low=0, high=2),
        "top_p": number(body, "top_p", low=0, high=1, low_inclusive=False),
        "seed": integer(body, "seed", low=_SEED_RANGE[0], high=_SEED_RANGE[1]),
        "stop": stop_sequences(body),
        "stream": boolean(body, "stream"),
    }
    vllm_body = {name: value for name, value in vllm_body.items() if value is not None}
    if chat:
        vllm_body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", vllm_body
    vllm_body["prompt"] = prompt
    return "/v1/completions", vllm_body


def _choice_text(choice: dict) -> str | None:
    """Text of a completion choice, a chat message or a chat delta."""
    if "text" in choice:
        return choice["text"]
    part = choice.get("message") or choice.get("delta") or {}
    return part.get("content") if isinstance(part, dict) else None


@bp.post("/generate")
@holds_generation_slot
def generate():
    path, vllm_body = _vllm_body(json_object())  # (each field checked there)
    fit_to_model(vllm_body, upstream().models())

    def rewrite_event(payload: dict) -> bytes:
        out = b""
        for choice in choices(payload):
            index = choice.get("index", 0)
            text = _choice_text(choice)
            if text:
                out += data_event({"type": "delta", "index": index, "text": text})
            if choice.get("finish_reason") is not None:
                out += data_event({"type": "finish", "index": index, "finish_reason": choice["finish_reason"]})
        return out

    def rewrite_json(payload: dict) -> dict:
        answers = sorted(choices(payload), key=lambda choice: choice.get("index", 0))
        if len(answers) != vllm_body["n"]:
            raise upstream_garbage(f"vLLM returned {len(answers)} answers instead of {vllm_body['n']}.")
        return {
            "responses": [_choice_text(choice) or "" for choice in answers],
            "finish_reasons": [choice.get("finish_reason") for choice in answers],
            "usage": payload.get("usage", {}),
            "model": payload.get("model", vllm_body.get("model")),
        }

    return forward(path, vllm_body, error_event=generate_error_event,
                   rewrite_event=rewrite_event, rewrite_json=rewrite_json)
