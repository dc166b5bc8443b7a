"""Which conversation a generation belongs to, for the vLLM router before several vLLM replicas.

The router's consistent_hash policy sends requests with the same X-Session-ID to the same replica.
The DCE extension sends one prompt as 10-20 streams at once: on one replica they share its prefix
cache and the prompt is computed once, where spread over the replicas every GPU would compute it.
The id is a hash of the key's name and the start of the conversation (its messages or Responses
input items up to the first user message, or the prompt): never the key or the text, the same for every tab of a batch and for
each later turn of a chat, and different for another prompt, which may then land on another replica.
Without it, vllm-router 0.1.17's consistent_hash sent every request to one replica (measured: its
key for a request without a session was empty).
"""

from __future__ import annotations

import hashlib
import json

SESSION_HEADER = "X-Session-ID"


def session_id(key: str | None, body: dict) -> str:
    if isinstance(body.get("messages"), list):
        start = _conversation_start(body["messages"])
    elif "input" in body:  # the Responses API: its instructions, then its input items
        start = [body.get("instructions"), _conversation_start(body["input"]) if isinstance(body["input"], list)
                 else body["input"]]
    else:
        start = body.get("prompt")
    digest = hashlib.sha256((key or "").encode())
    digest.update(b"\0")
    digest.update(json.dumps(start, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def _conversation_start(messages: list) -> list:
    """The messages up to the first of the user's (any system prompt, then the first question)."""
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return messages[:index + 1]
    return messages
