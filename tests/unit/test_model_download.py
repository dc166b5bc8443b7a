"""The model download step (vllm/download_model.py, issue 14): what it says while it runs and the
status it leaves for the proxy. Its hub side runs in the real vLLM image (integration suite)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def download_model():
    spec = importlib.util.spec_from_file_location("download_model", REPO / "vllm/download_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # huggingface_hub is imported only where the hub is used
    return module


def test_progress_reads_as_make_up_shows_it(download_model):
    assert download_model.progress_line(5_200_000_000, 12_100_000_000) == \
        "downloading the model: 42 % (5.2 of 12.1 GB)"
    assert download_model.progress_line(13, 12).startswith("downloading the model: 100 %")


def test_the_cache_counts_finished_and_incoming_files_once(download_model, tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b.incomplete").write_bytes(b"x" * 5)
    (tmp_path / "link").symlink_to(tmp_path / "a")  # snapshots link to blobs: not counted twice
    assert download_model.bytes_in(tmp_path) == 15


def test_a_local_model_needs_no_download_and_says_ready(download_model, tmp_path, monkeypatch, capsys):
    status = tmp_path / "model.json"
    monkeypatch.setenv("DCE_MODEL", "/models/tiny")
    monkeypatch.setenv("DCE_MODEL_STATUS", str(status))
    assert download_model.main() == 0
    assert "nothing to download" in capsys.readouterr().out
    assert json.loads(status.read_text()) == {"state": "ready", "downloaded": "/models/tiny"}
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, then renamed


def _hub_answer(status_code: int, name: str = "HfHubHTTPError") -> Exception:
    """What huggingface_hub raises for a hub's HTTP answer: the response rides along."""
    error = type(name, (Exception,), {})(f"HTTP {status_code}")
    error.response = type("Response", (), {"status_code": status_code})()
    return error


class ConnectError(Exception):
    """httpx's name for a connection that could not be made."""


def test_a_dry_runs_error_is_told_by_its_cause(download_model):
    try:
        try:
            raise ConnectError("[Errno 111] Connection refused")
        except ConnectError:
            raise OSError("Dry run cannot be performed as the repository cannot be accessed.")  # DryRunError
    except OSError as error:
        assert "not reachable from this host" in download_model.reason_for(error, "openai/gpt-oss-20b")


@pytest.mark.parametrize("error, reason", [
    (_hub_answer(401), "needs a Hugging Face token"),
    (_hub_answer(403, "GatedRepoError"), "accept the licence"),
    (_hub_answer(404, "RepositoryNotFoundError"), "is not on the Hugging Face hub"),
    (_hub_answer(429), "limiting this host's requests"),
    (_hub_answer(502), "answered HTTP 502"),
    (OSError(28, "No space left on device"), "no space left"),
    (PermissionError(13, "Permission denied"), "not writable by vLLM's user"),
    (ConnectError("[Errno -3] Temporary failure in name resolution"), "not reachable from this host"),
    (TimeoutError(), "not reachable from this host"),
])
def test_each_failure_says_what_the_operator_can_do(download_model, error, reason):
    said = download_model.reason_for(error, "openai/gpt-oss-20b")
    assert reason in said, said
    assert "name resolution" not in said  # what reaches every 503 names no host of the network


def test_a_model_downloaded_whole_stays_known_through_a_later_failure(download_model, tmp_path, capsys):
    status = tmp_path / "model.json"
    download_model.write_status(status, state="ready", downloaded="openai/gpt-oss-20b")
    assert download_model.failed(status, "stopped before it finished") == 1
    assert download_model.completed(status) == "openai/gpt-oss-20b"
    assert json.loads(status.read_text())["state"] == "failed"
    assert download_model.completed(tmp_path / "none.json") is None
