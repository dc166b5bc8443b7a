"""vLLM 0.32's OpenAI answers, as its server writes them (compact JSON, its key order), for the two
FAKE vLLMs: the unit suite's (tests/unit/fake_vllm.py) and the benchmark's
(tests/bench/fake_openai_upstream.py). One description, so that both fakes speak the same vLLM
(measured against the real engine: ../shared/notes/measured-here.md)."""

from __future__ import annotations

import json
from typing import Any

CREATED = 1_764_000_000  # a fixed timestamp: the fakes' bytes are the same on every run
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    # vLLM (pydantic / FastAPI) writes compact JSON.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def event(payload: dict) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


def answer_head(chat: bool, model: str, *, streamed: bool) -> dict:
    """The fields that open every answer and every chunk of a stream."""
    kind = ("chat.completion.chunk" if streamed else "chat.completion") if chat else "text_completion"
    return {"id": "chatcmpl-fake" if chat else "cmpl-fake", "object": kind, "created": CREATED, "model": model}


def stream_choice(chat: bool, index: int, delta_or_text: Any, finish_reason: str | None = None) -> dict:
    """One choice of a streamed chunk: a chat delta, or a completion's text."""
    if chat:
        return {"index": index, "delta": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": delta_or_text, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": None}


def whole_choice(chat: bool, index: int, text: str, finish_reason: str, **message_fields: Any) -> dict:
    """One choice of an answer that is not streamed."""
    if chat:
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                   "function_call": None, "tool_calls": [], **message_fields}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason,
                "stop_reason": None}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
            "prompt_logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int, **details: Any) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, **details}


def models_body(model_ids, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": mid, "object": "model", "created": CREATED, "owned_by": "vllm", "root": f"/models/{mid}",
         "parent": None, "max_model_len": max_model_len,
         "permission": [{"id": "modelperm-fake", "object": "model_permission", "created": CREATED,
                         "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                         "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                         "organization": "*", "group": None, "is_blocking": False}]}
        for mid in model_ids]}
