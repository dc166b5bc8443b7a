"""What the model download says (vllm/download_model.py writes it), for the 503 a user gets while
vLLM is not there yet: "downloading the model: 43 %" tells more than "vLLM is not reachable"."""

from __future__ import annotations

import json


def not_ready_reason(status_file: str) -> str | None:
    """The download's state as a reason, or None when it has nothing to add (done, or no file)."""
    if not status_file:
        return None
    try:
        with open(status_file, encoding="utf-8") as file:
            status = json.load(file)
    except (OSError, ValueError):
        return None
    if status.get("state") == "downloading":
        done, total = status.get("done_bytes", 0), status.get("total_bytes", 0)
        return (f"vLLM is not ready: downloading the model: {status.get('percent', 0)} % "
                f"({done / 1e9:.1f} of {total / 1e9:.1f} GB).")
    if status.get("state") == "failed":
        return f"vLLM cannot start: the model download failed: {status.get('reason', 'no reason given')}"
    return None
