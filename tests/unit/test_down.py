"""`make down` (scripts/down.sh, issue 14): a running proxy is told of the stop first, with the
stack's own grace, and the stack goes down only after; a stack whose proxy is not running just
goes down. Docker is a stub that records its calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def checkout(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/down.sh", tmp_path / "scripts/down.sh")
    (tmp_path / ".env").write_text("DCE_STOP_GRACE_SECONDS=45\n")
    (tmp_path / "bin").mkdir()
    return tmp_path


def _down(checkout: Path, proxy_running: bool, *args: str) -> list[str]:
    docker = checkout / "bin/docker"
    running = "echo abc123" if proxy_running else "true"
    docker.write_text(f'#!/bin/sh\necho "$*" >> {checkout}/calls\ncase "$*" in *" ps "*) {running} ;; esac\n')
    docker.chmod(0o755)
    result = subprocess.run(["bash", "scripts/down.sh", *args], cwd=checkout, capture_output=True, text=True,
                            env={"PATH": f"{checkout / 'bin'}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    return (checkout / "calls").read_text().splitlines()


def test_a_running_proxy_is_told_of_the_stop_before_anything_stops(checkout):
    calls = _down(checkout, True, "--volumes")
    announce = calls.index("compose exec -T proxy python3 -m dce_proxy.stopping announce 45")
    assert calls[announce + 1:] == ["compose down --remove-orphans --volumes"]


def test_a_stack_without_a_running_proxy_just_goes_down(checkout):
    calls = _down(checkout, False)
    assert not any("stopping" in call for call in calls)
    assert calls[-1] == "compose down --remove-orphans"
