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
    assert json.loads(status.read_text()) == {"state": "ready"}
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, then renamed
