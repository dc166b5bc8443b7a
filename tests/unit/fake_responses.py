"""The Responses API as the FAKE vLLM (fake_vllm.py) answers it: vLLM 0.32's objects and its event
stream (typed events; response.completed last, with the usage; no [DONE]), as measured against the
real engine (`event: TYPE` then `data: {...}` per event, sequence numbers from 0)."""

from __future__ import annotations

import json
from typing import Any, Iterator

RESPONSE_ID = "resp_fake0123456789"
_ITEM_ID = "msg_fake0123456789"
PROMPT_TOKENS = 11


def response_object(model: str, text: str | None, tokens: int, status: str, created: int) -> dict[str, Any]:
    output = [] if text is None else [{
        "id": _ITEM_ID, "type": "message", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]}]
    usage = None if status == "in_progress" else {
        "input_tokens": PROMPT_TOKENS, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": PROMPT_TOKENS + tokens}
    # vLLM's field order: usage comes before the last fields, not at the very end.
    return {"id": RESPONSE_ID, "created_at": created, "model": model, "object": "response", "output": output,
            "status": status, "usage": usage, "user": None, "input_messages": None, "output_messages": None}


def response_events(model: str, pieces: list[str], created: int) -> Iterator[tuple[int, bytes]]:
    """(content round, event bytes) in vLLM's order; a round is the index of the text delta."""
    sequence = iter(range(10_000))

    def event(type_: str, **fields) -> bytes:
        data = {**fields, "sequence_number": next(sequence), "type": type_}
        return f"event: {type_}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    yield -1, event("response.created", response=response_object(model, None, 0, "in_progress", created))
    yield -1, event("response.in_progress", response=response_object(model, None, 0, "in_progress", created))
    yield -1, event("response.output_item.added", item={"id": _ITEM_ID, "type": "message", "content": []},
                    output_index=0)
    for round_, piece in enumerate(pieces):
        yield round_, event("response.output_text.delta", content_index=0, delta=piece, item_id=_ITEM_ID,
                            logprobs=[], output_index=0)
    text = "".join(pieces)
    yield len(pieces), event("response.output_text.done", content_index=0, item_id=_ITEM_ID, text=text,
                             output_index=0)
    yield len(pieces), event("response.completed", response=response_object(model, text, len(pieces), "completed", created))
