"""The model download step (issue 14) in the real vLLM image: the test stack's model is in its
image (nothing to download), and a hub that cannot be reached is a failure with the reason, at
once, in the status the proxy tells users, not a start that hangs."""

from __future__ import annotations

import json
import subprocess

from stack import REPO

CPU_IMAGE = "dce-vllm-cpu:0.32.0-tiny"


def test_the_test_stacks_model_needs_no_download(stack):
    download = stack.container("model-download")
    assert download.attrs["State"]["ExitCode"] == 0
    assert "nothing to download" in download.logs().decode()


def test_an_unreachable_hub_fails_at_once_with_the_reason(tmp_path):
    tmp_path.chmod(0o777)  # the image's user writes the status here
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3",
         "-v", f"{REPO / 'vllm/download_model.py'}:/opt/dce/download_model.py:ro", "-v", f"{tmp_path}:/model-status",
         "-e", "DCE_MODEL=openai/gpt-oss-20b", "-e", "DCE_MODEL_STATUS=/model-status/model.json",
         "-e", "HF_HUB_ETAG_TIMEOUT=30", "-e", "HF_HUB_DOWNLOAD_TIMEOUT=60",
         CPU_IMAGE, "/opt/dce/download_model.py"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the model download failed: the Hugging Face hub is not reachable from this host" in result.stderr
    status = json.loads((tmp_path / "model.json").read_text())
    assert status["state"] == "failed" and "not reachable" in status["reason"], status
