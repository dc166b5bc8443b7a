"""The model's download, as its own step before vLLM starts (compose service `model-download`).

`make up` shows its progress, and the proxy tells a user who asks meanwhile ("downloading the
model: 43 %"). Where the hub cannot be reached, or the model is not there, it fails at once with
the reason instead of leaving vLLM to hang in its start. vLLM then finds every file in the cache.

Its state goes to DCE_MODEL_STATUS (JSON, read by the proxy): {"state": "downloading",
"percent": 43, "done_bytes": …, "total_bytes": …}, {"state": "ready"} or {"state": "failed",
"reason": "…"}. Runs in the vLLM image, which has huggingface_hub.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

# What vLLM reads of a Hugging Face model: its configuration, tokenizer, chat template and
# safetensors weights. Not the copies some repositories add for other runtimes (gpt-oss ships its
# weights twice more, in original/ and metal/), which vLLM ignores too.
ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
IGNORE = ["original/*", "metal/*"]
PROGRESS_EVERY_SECONDS = 5.0


def write_status(path: Path, **state) -> None:
    """Whole or not at all: the proxy may read it at any moment."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(path)


def progress_line(done: int, total: int) -> str:
    percent = min(100, done * 100 // total) if total else 100
    return f"downloading the model: {percent} % ({done / 1e9:.1f} of {total / 1e9:.1f} GB)"


def reason_for(error: BaseException, model: str) -> str:
    """What an operator can act on, from what huggingface_hub raised."""
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return f"{model} needs an accepted licence and a token: put a Hugging Face token in the HF_TOKEN_SECRET file"
    if isinstance(error, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
        return f"{model} is not on the Hugging Face hub (or is private: a token goes in the HF_TOKEN_SECRET file)"
    if isinstance(error, errors.LocalEntryNotFoundError) or isinstance(error, OSError) or \
            "connect" in type(error).__name__.lower() or "timeout" in type(error).__name__.lower():
        return (f"the Hugging Face hub is not reachable from this host ({type(error).__name__}: {error}); "
                "put the model in the hf_cache volume, or a local folder in VLLM_MODEL")
    return f"{type(error).__name__}: {error}"


def bytes_in(folder: Path) -> int:
    """What the cache holds of the model so far, finished files and ones still coming in."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except FileNotFoundError:  # renamed from .incomplete meanwhile
            pass
    return total


def download(model: str, status: Path) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        plan = snapshot_download(model, allow_patterns=ALLOW, ignore_patterns=IGNORE, dry_run=True)
    except Exception as error:  # noqa: BLE001 - every failure is told, with its reason
        try:  # a host with no route out (DCE_BACKEND_INTERNAL) and the model already in its cache
            snapshot_download(model, allow_patterns=ALLOW, ignore_patterns=IGNORE, local_files_only=True)
        except Exception:  # noqa: BLE001 - the hub's error is the one to tell
            return failed(status, reason_for(error, model))
        print(f"the model {model} is in the cache (the hub did not answer: {type(error).__name__})", flush=True)
        write_status(status, state="ready")
        return 0
    total = sum(file.file_size or 0 for file in plan if file.will_download)
    if total == 0:
        print(f"the model {model} is in the cache already", flush=True)
        write_status(status, state="ready")
        return 0

    cache = Path(HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "blobs"
    before = bytes_in(cache) if cache.exists() else 0
    outcome: list[BaseException | None] = []

    def fetch():
        try:
            snapshot_download(model, allow_patterns=ALLOW, ignore_patterns=IGNORE)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            outcome.append(error)

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    while worker.is_alive():
        done = max(0, (bytes_in(cache) if cache.exists() else 0) - before)
        print(progress_line(done, total), flush=True)
        write_status(status, state="downloading", percent=min(100, done * 100 // total), done_bytes=done,
                     total_bytes=total)
        worker.join(PROGRESS_EVERY_SECONDS)
    if outcome and outcome[0] is not None:
        return failed(status, reason_for(outcome[0], model))
    print(f"the model {model} is downloaded ({total / 1e9:.1f} GB)", flush=True)
    write_status(status, state="ready")
    return 0


def failed(status: Path, reason: str) -> int:
    print(f"the model download failed: {reason}", file=sys.stderr, flush=True)
    write_status(status, state="failed", reason=reason)
    return 1


def main() -> int:
    model = os.environ["DCE_MODEL"]
    status = Path(os.environ.get("DCE_MODEL_STATUS", "/model-status/model.json"))
    if model.startswith(("/", "./")):
        print(f"a local model ({model}): nothing to download", flush=True)
        write_status(status, state="ready")
        return 0
    return download(model, status)


if __name__ == "__main__":
    sys.exit(main())
