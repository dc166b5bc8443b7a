"""The model's download, as its own step before vLLM starts (compose service `model-download`).

`make up` shows its progress, and the proxy tells a user who asks meanwhile ("downloading the
model: 43 %"). Where the hub cannot be reached, or the model is not there, it fails at once with
the reason instead of leaving vLLM to hang in its start. vLLM then finds in the cache the files it
would fetch itself (it may still ask the hub about them as it starts).

Its state goes to DCE_MODEL_STATUS (JSON, read by the proxy): {"state": "downloading",
"percent": 43, "done_bytes": …, "total_bytes": …}, {"state": "ready"} or {"state": "failed",
"reason": "…"}. Runs in the vLLM image, which has huggingface_hub.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

# What vLLM itself fetches of a Hugging Face model: its configuration, tokenizer and chat template,
# and its safetensors weights with vLLM's own default ignore pattern (LoadConfig.ignore_patterns),
# so vLLM finds in the cache what it would otherwise fetch, unseen, while "loading the model".
ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
IGNORE = ["original/**/*"]
PROGRESS_EVERY_SECONDS = 5.0
# A hub (or a proxy in the way) that takes the connection and never answers: huggingface_hub's own
# timeouts do not bound every call, so the step does. Also the longest a download may go without a byte.
HUB_SILENCE_SECONDS = float(os.environ.get("DCE_HUB_SILENCE_SECONDS", "120"))


def write_status(path: Path, **state) -> None:
    """Whole or not at all: the proxy may read it at any moment."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(path)


def progress_line(done: int, total: int) -> str:
    percent = min(100, done * 100 // total) if total else 100
    return f"downloading the model: {percent} % ({done / 1e9:.1f} of {total / 1e9:.1f} GB)"


def reason_for(error: BaseException, model: str) -> str:
    """What an operator can act on, from what huggingface_hub raised: the first error along its
    causes that says something (a dry run's error wraps the hub's or the network's)."""
    cause: BaseException | None = error
    while cause is not None:
        reason = _reason(cause, model)
        if reason:
            return reason
        cause = cause.__cause__ or cause.__context__
    return f"{type(error).__name__}: {error}"


def _reason(error: BaseException, model: str) -> str | None:
    # The hub's HTTP errors carry its answer; connection errors are httpx's; disk errors have an errno.
    status = getattr(getattr(error, "response", None), "status_code", None)
    name = type(error).__name__
    if status == 401 or (status == 403 and "Gated" in name):
        return (f"{model} needs a Hugging Face token that may read it (gated models: accept the licence on "
                "the hub first); put it in the HF_TOKEN_SECRET file")
    if status in (403, 404) or name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return f"{model} is not on the Hugging Face hub, or is private (a token goes in the HF_TOKEN_SECRET file)"
    if status == 429:
        return "the Hugging Face hub is limiting this host's requests (HTTP 429): make up again later"
    if status is not None:
        return f"the Hugging Face hub answered HTTP {status}: make up again later"
    if name == "OfflineModeIsEnabled":
        return "HF_HUB_OFFLINE is set, and the model is not in the hf_cache volume"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left for the model in the hf_cache volume: free some disk"
    if isinstance(error, PermissionError):
        return f"the model cache is not writable by vLLM's user ({error}): make up again hands it over"
    if name == "LocalEntryNotFoundError" or any(word in name for word in ("Connect", "Timeout", "Network", "Proxy")) \
            or isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return (f"the Hugging Face hub is not reachable from this host ({name}); put the model in the hf_cache "
                "volume, or a local folder in VLLM_MODEL")
    return None


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
        plan = in_time(lambda: snapshot_download(model, allow_patterns=ALLOW, ignore_patterns=IGNORE, dry_run=True))
    except Exception as error:  # noqa: BLE001 - every failure is told, with its reason
        # A host with no route out (DCE_BACKEND_INTERNAL) may still have the whole model: only a
        # download this step finished says so (the cache alone cannot tell a cut one from a whole one).
        if completed(status) != model:
            return failed(status, reason_for(error, model))
        print(f"the model {model} is in the cache (the hub did not answer: {type(error).__name__})", flush=True)
        write_status(status, state="ready", downloaded=model)
        return 0
    total = sum(file.file_size or 0 for file in plan if file.will_download)
    if total == 0:
        print(f"the model {model} is in the cache already", flush=True)
        write_status(status, state="ready", downloaded=model)
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
    # Stopped (make down) before the end: said, rather than "downloading 43 %" left behind for good.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(failed(status, "stopped before it finished "
                                                                        "(make up goes on with it)")))
    last_byte_at, last_done = time.monotonic(), -1
    while worker.is_alive():
        done = max(0, (bytes_in(cache) if cache.exists() else 0) - before)
        if done != last_done:
            last_byte_at, last_done = time.monotonic(), done
        elif time.monotonic() - last_byte_at > HUB_SILENCE_SECONDS:
            return failed(status, reason_for(TimeoutError(f"no byte for {HUB_SILENCE_SECONDS:g} s"), model))
        print(progress_line(done, total), flush=True)
        write_status(status, state="downloading", percent=min(100, done * 100 // total), done_bytes=done,
                     total_bytes=total, downloaded=completed(status))
        worker.join(PROGRESS_EVERY_SECONDS)
    if outcome and outcome[0] is not None:
        return failed(status, reason_for(outcome[0], model))
    print(f"the model {model} is downloaded ({total / 1e9:.1f} GB)", flush=True)
    write_status(status, state="ready", downloaded=model)
    return 0


def in_time(call):
    """call() in a thread of its own, waited for HUB_SILENCE_SECONDS at most (the thread is left
    behind: the step then ends)."""
    outcome: list = []

    def run():
        try:
            outcome.append((True, call()))
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome.append((False, error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HUB_SILENCE_SECONDS)
    if not outcome:
        raise TimeoutError(f"the hub did not answer within {HUB_SILENCE_SECONDS:g} s")
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def completed(status: Path) -> str | None:
    """The model this step last downloaded whole, kept through later states (a cut download of
    another model does not make that one whole)."""
    try:
        return json.loads(status.read_text()).get("downloaded")
    except (OSError, ValueError, AttributeError):
        return None


def failed(status: Path, reason: str) -> int:
    print(f"the model download failed: {reason}", file=sys.stderr, flush=True)
    write_status(status, state="failed", reason=reason, downloaded=completed(status))
    return 1


def main() -> int:
    model = os.environ["DCE_MODEL"]
    status = Path(os.environ.get("DCE_MODEL_STATUS", "/model-status/model.json"))
    if model.startswith(("/", "./")):
        print(f"a local model ({model}): nothing to download", flush=True)
        write_status(status, state="ready", downloaded=model)
        return 0
    return download(model, status)


if __name__ == "__main__":
    sys.exit(main())
