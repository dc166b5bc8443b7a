"""The model download step (issue 14) in the real vLLM image: the test stack's model is in its
image (nothing to download), and a hub that cannot be reached is a failure with the reason, at
once, in the status the proxy tells users, not a start that hangs."""

from __future__ import annotations

import json
import subprocess

from stack import LOCAL_IMAGES, REPO

CPU_IMAGE = LOCAL_IMAGES["VLLM_CPU_IMAGE"]


def test_the_test_stacks_model_needs_no_download(stack):
    download = stack.container("model-download")
    assert download.attrs["State"]["ExitCode"] == 0
    assert "nothing to download" in download.logs().decode()


def _download_step(status_dir, command: list[str], **env: str) -> subprocess.CompletedProcess:
    """The model-download service's program for gpt-oss in the vLLM image, with no network."""
    status_dir.chmod(0o777)  # the image's user writes the status here
    settings = {"DCE_MODEL": "openai/gpt-oss-20b", "DCE_MODEL_STATUS": "/model-status/model.json",
                "HF_HUB_OFFLINE": "0",  # as in the GPU image (the CPU image runs offline by default)
                "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "60", **env}  # compose.yaml's
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3",
         "-v", f"{REPO / 'vllm/download_model.py'}:/opt/dce/download_model.py:ro", "-v", f"{status_dir}:/model-status",
         *(f"--env={name}={value}" for name, value in settings.items()), CPU_IMAGE, *command],
        capture_output=True, text=True, timeout=300)


def test_an_unreachable_hub_fails_at_once_with_the_reason(tmp_path):
    result = _download_step(tmp_path, ["/opt/dce/download_model.py"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the model download failed: the Hugging Face hub is not reachable from this host" in result.stderr
    status = json.loads((tmp_path / "model.json").read_text())
    assert status["state"] == "failed" and "not reachable" in status["reason"], status


# Runs in the vLLM image: a "hub" that takes connections and never answers (a proxy or firewall
# that holds them), then the download step against it.
_SILENT_HUB = """
import os, runpy, socket, sys
hub = socket.socket()
hub.bind(("127.0.0.1", 0))
hub.listen(64)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.getsockname()[1]}"
sys.argv = ["download_model.py"]
runpy.run_path("/opt/dce/download_model.py", run_name="__main__")
"""


def test_a_hub_that_never_answers_is_a_failure_not_a_hang(tmp_path):
    # huggingface_hub's own timeouts leave its first call unbounded: measured, it hung for good.
    result = _download_step(tmp_path, ["-c", _SILENT_HUB], DCE_HUB_SILENCE_SECONDS="5")  # 120 in the stack
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the Hugging Face hub is not reachable from this host" in result.stderr, result.stderr
